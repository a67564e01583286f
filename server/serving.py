"""What the generation endpoints share: reading a request, the model check, prompts, limits.

`Serving` holds the front end's state (served names, tokenizer, engine client, the
`vllm serve` front-end switches) and the steps every generation request takes in
vLLM's order: read the JSON body (its virtual arrival is stamped right after), check
the model, check admission, render and tokenize the prompt, check its length, clamp
`max_tokens`, verify the sampling parameters. Lengths are checked against the context of
the model the request names (in a cluster, the instances serving it may differ).

On the front door of a cluster whose entry is any_non_decode (LLMServingSim's router), a request naming
no model goes to a non-decode instance of any model, and takes that instance's model: it is admitted
unless every such instance up is at a queue bound, and refused for its length only when it fits none of
them (the core routes it only to those it fits). Its prompt is tokenized before the router picks, so
this holds where those instances share the first model's tokenizer; token ids of one vocabulary mean
nothing to a model of another, so on a cluster of several tokenizers it stays the first model's.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from emulator.disaggregation import model_not_found
from emulator.instance import Instance
from emulator.lora import LoRAAdapter, parse_lora_modules
from profiles.chat_template import load_chat_template
from profiles.tokenizer import Tokenizer
from server.engine_client import EngineClient, GenerationPaused, PromptRefused
from server.cors import CORSPolicy
from server.errors import (APIError, from_pydantic, internal_error, invalid_json, json_response, not_found,
                           schema_error, streaming_error, structured_outputs_need_tokenizer, tokenizer_unavailable,
                           unparsable_body, validation_error)
from server.generation import Sampling, StopRules
from server.harmony import harmony_tokens, uses_harmony
from server.generation_config import SamplingDefaults
from server.jobs import Choice, ChunkFormat, Job
from server.logprobs import LogprobSource
from server.lora import LoRAAdapters, cluster_adapters, runtime_updating
from server.request_body import BodyDecoder, UndecodableBody
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.kv_events import kv_cache_report_mode
from server.session_id import vllm_session_id
from server.request_log import DeltaLogging, RequestLogger
from server.sampling_params import SamplingParams, from_chat, from_completion
from server.sse import DONE, SSEChannel
from server.tool_parsers import PARSERS
from server.vllm_flags import UNSUPPORTED_PREFIX
from server.structured import INTERPRETED, Constraint, StructuredText, constraint_of
from server.reasoning import ThinkingPlan, parser_name

log = logging.getLogger("vllm_emulator.server")

M = TypeVar("M", bound=BaseModel)
_BODY = web.RequestKey("json_body", tuple)
METRICS = web.AppKey("metrics", object)  # the port's own metrics (server.metrics.EngineMetrics)


@dataclass
class FrontendOptions:
    """`vllm serve`'s front-end switches that change responses."""
    served_model_names: list[str]
    model_root: str
    max_logprobs: int = 20
    stream_interval: int = 1
    enable_force_include_usage: bool = False
    enable_prompt_tokens_details: bool = False
    enable_request_id_headers: bool = False
    enable_server_load_tracking: bool = False
    enable_per_request_metrics: bool = False
    return_tokens_as_token_ids: bool = False
    enable_auto_tools: bool = False          # --enable-auto-tool-choice (with --tool-call-parser)
    tool_call_parser: str | None = None
    exclude_tools_when_tool_choice_none: bool = False
    trust_request_chat_template: bool = False
    chat_template: str | None = None         # --chat-template's text (profiles/chat_template.py)
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # under each request's (chat.py)
    tokenizer_info_endpoint: bool = False    # --enable-tokenizer-info-endpoint: GET /tokenizer_info
    reasoning: bool = False                  # --reasoning-parser or --reasoning-config given
    reasoning_parser: str | None = None      # --reasoning-parser (its adjust_request: server/tool_parsers.py)
    tool_strict_level: str | None = None     # --tool-strict-level (structural tags: server/tool_parsers.py)
    system_fingerprint: str | None = None
    api_keys: list[str] = field(default_factory=list)
    fastapi_docs: bool = True  # /openapi.json, /docs, /redoc (vLLM's --disable-fastapi-docs turns them off)
    offline_docs: bool = False  # /docs from local assets, no /redoc (vLLM's --enable-offline-docs)
    enable_scale_out: bool = False  # /render, /derender, /inference/v1/generate served (server/scale_out.py)
    tokens_only: bool = False       # --tokens-only: those too, and generate never detokenizes
    skip_tokenizer_init: bool = False  # --skip-tokenizer-init (set by --tokens-only too): the API has no tokenizer
    lora_adapters: LoRAAdapters | None = None  # --lora-modules and runtime loads, shared by every port (lora.py)
    request_logger: RequestLogger | None = None  # --enable-log-requests (with --enable-log-outputs, --max-log-len)
    cors: CORSPolicy = field(default_factory=CORSPolicy)  # --allowed-origins/-methods/-headers, --allow-credentials
    generation_config: str = "auto"          # --generation-config: auto (the model's), vllm (none), or a folder
    override_generation_config: dict[str, Any] = field(default_factory=dict)  # --override-generation-config
    # each served name's defaults under those two (serve.py builds them once per served model; none: {})
    sampling_defaults: dict[str, SamplingDefaults] = field(default_factory=dict)


# `vllm serve` switches read from the flags accepted as vLLM's (vllm_flags.py): (option, its on/off spellings)
_SWITCHES = {
    "enable_auto_tools": ("--enable-auto-tool-choice", "--disable-auto-tool-choice"),
    "return_tokens_as_token_ids": ("--return-tokens-as-token-ids", "--no-return-tokens-as-token-ids"),
    "exclude_tools_when_tool_choice_none": ("--exclude-tools-when-tool-choice-none",
                                            "--no-exclude-tools-when-tool-choice-none"),
    "trust_request_chat_template": ("--trust-request-chat-template", "--no-trust-request-chat-template"),
    "enable_scale_out": ("--enable-scale-out", "--disable-scale-out"),
    "tokens_only": ("--tokens-only", "--no-tokens-only"),
    "skip_tokenizer_init": ("--skip-tokenizer-init", "--no-skip-tokenizer-init"),
    "tokenizer_info_endpoint": ("--enable-tokenizer-info-endpoint", "--disable-tokenizer-info-endpoint"),
}
SIMULATED_VLLM_FLAGS = frozenset({"--tool-call-parser", "--tool-strict-level", "--lora-modules", "--chat-template",
                                  "--default-chat-template-kwargs", "--enable-log-requests", "--enable-log-outputs",
                                  "--enable-log-deltas", "--max-log-len", "--reasoning-parser",
                                  "--reasoning-parser-plugin", "--allowed-origins", "--allowed-methods",
                                  "--allowed-headers", "--allow-credentials", "--generation-config",
                                  "--override-generation-config", *(on for on, _ in _SWITCHES.values())})


def frontend_switches(args) -> dict[str, Any]:
    """The FrontendOptions that vLLM flags outside serve's own set (tools, token ids as strings, request
    chat templates, reasoning), checked as vLLM checks them at start-up (ValueError)."""
    prefix = UNSUPPORTED_PREFIX
    out: dict[str, Any] = {}
    for option, (on, _) in _SWITCHES.items():
        out[option] = getattr(args, prefix + on[2:].replace("-", "_"), None) == on
    out["skip_tokenizer_init"] |= out["tokens_only"]  # vLLM's EngineArgs: tokens-only mode skips the tokenizer
    out["tool_call_parser"] = getattr(args, prefix + "tool_call_parser", None)
    template = getattr(args, prefix + "chat_template", None)
    out["chat_template"] = load_chat_template(template) if template is not None else None
    out["default_chat_template_kwargs"] = _json_object_flag(args, "--default-chat-template-kwargs")
    out["reasoning_parser"] = parser_name(getattr(args, prefix + "reasoning_parser", None),  # (server/reasoning.py)
                                          getattr(args, prefix + "reasoning_parser_plugin", None))
    out["reasoning"] = bool(out["reasoning_parser"] or getattr(args, prefix + "reasoning_config", None))
    level = getattr(args, prefix + "tool_strict_level", None)
    if level not in (None, "None", "auto", "function", "parameter"):  # vLLM's argparse choices
        raise ValueError(f"argument --tool-strict-level: invalid choice: {level!r} (choose from auto, function, "
                         "parameter, None)")
    out["tool_strict_level"] = None if level in (None, "None") else level
    if out["enable_auto_tools"] and not out["tool_call_parser"]:
        raise ValueError("Error: --enable-auto-tool-choice requires --tool-call-parser")
    if out["enable_auto_tools"] and out["tool_call_parser"] not in PARSERS \
            and not getattr(args, prefix + "tool_parser_plugin", None):  # (a plugin may register it)
        raise ValueError(f"invalid tool call parser: {out['tool_call_parser']} "  # vLLM's validate_api_server_args
                         f"(chose from {{ {','.join(sorted(PARSERS))} }})")
    if getattr(args, prefix + "enable_log_outputs", None) == "--enable-log-outputs" and \
            getattr(args, prefix + "enable_log_requests", None) != "--enable-log-requests":
        raise ValueError("Error: --enable-log-outputs requires --enable-log-requests")  # vLLM's start-up check
    out["request_logger"] = _request_logger(args)
    out["generation_config"] = getattr(args, prefix + "generation_config", None) or "auto"  # vLLM's default
    out["override_generation_config"] = _json_object_flag(args, "--override-generation-config")
    out["cors"] = _cors_policy(args)
    out["lora_adapters"] = _lora_adapters(args)
    return out


def _cors_policy(args) -> CORSPolicy:
    """The CORSMiddleware vLLM installs from its four CORS flags (their JSON lists; vLLM's defaults otherwise)."""
    def listed(flag: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = getattr(args, UNSUPPORTED_PREFIX + flag[2:].replace("-", "_"), None)  # json.loads'd (vllm_flags.py)
        if value is None:
            return default
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ValueError(f"argument {flag}: expected a JSON list of strings, got {json.dumps(value)}")
        return tuple(value)
    return CORSPolicy(listed("--allowed-origins", ()), listed("--allowed-methods", ("*",)),
                      listed("--allowed-headers", ("*",)),
                      getattr(args, UNSUPPORTED_PREFIX + "allow_credentials", None) == "--allow-credentials")


def _request_logger(args) -> RequestLogger | None:
    """vLLM's RequestLogger when --enable-log-requests is given (--max-log-len read as its argparse int)."""
    if getattr(args, UNSUPPORTED_PREFIX + "enable_log_requests", None) != "--enable-log-requests":
        return None
    text = getattr(args, UNSUPPORTED_PREFIX + "max_log_len", None)
    try:
        max_log_len = None if text is None else int(text)
    except ValueError:
        raise ValueError(f"argument --max-log-len: invalid int value: {text!r}") from None
    outputs = getattr(args, UNSUPPORTED_PREFIX + "enable_log_outputs", None) == "--enable-log-outputs"
    deltas = getattr(args, UNSUPPORTED_PREFIX + "enable_log_deltas", None) != "--disable-log-deltas"
    return RequestLogger(max_log_len, outputs, deltas)


def _json_object_flag(args, flag: str) -> dict[str, Any]:
    """A flag vLLM reads with json.loads (its argparse error for text that is not JSON); {} when absent."""
    text = getattr(args, UNSUPPORTED_PREFIX + flag[2:].replace("-", "_"), None)
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise ValueError(f"argument {flag}: invalid loads value: {text!r}") from None
    if not value:  # vLLM takes dict(value or {}): null (or any empty value) is no defaults
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"argument {flag}: expected a JSON object, got {text!r}")
    return value


def _lora_adapters(args) -> LoRAAdapters | None:
    """The server's adapter registry with `--lora-modules` loaded (ValueError: vLLM's start-up error). A
    cluster's ports have none here: each takes the adapters of its instances (cluster file's lora-modules)."""
    modules = parse_lora_modules(getattr(args, UNSUPPORTED_PREFIX + "lora_modules", None) or [])
    if getattr(args, "cluster", None) is not None:
        if modules:
            raise ValueError("--lora-modules with --cluster: give each instance its own lora-modules in the "
                             "cluster file")
        return None
    names = args.served_model_name or [name for name in (args.model or args.model_tag,) if name]
    adapters = LoRAAdapters(args.max_lora_rank if args.enable_lora else None, names)
    adapters.load_static(modules)
    return adapters


class Serving:
    def __init__(self, engine: EngineClient, tokenizers: dict[str, Tokenizer], options: FrontendOptions,
                 pod: int | None = None, body_decoder: BodyDecoder | None = None,
                 instance: Instance | None = None) -> None:
        """`instance`: the cluster instance this port is (its own `vllm serve`); None: the front door of
        every instance. `pod`: with --port-per-engine, one data-parallel engine of the deployment alone.
        `tokenizers`: the tokenizer of each served model name."""
        self.engine = engine
        self.body_decoder = body_decoder or BodyDecoder()
        self.pod = pod  # serve only this engine, as if it were a pod of its own
        self.instance = instance
        self.tokenizers = tokenizers
        self.options = options
        behind = [instance] if instance is not None else engine.sim.instances
        self.model_name = options.served_model_names[0]
        # each served name's context: the shortest of the instances behind this port that serve it
        self.max_model_lens = {
            name: min((i.deployment.config.max_model_len for i in behind if name in i.served_model_names),
                      default=min(i.deployment.config.max_model_len for i in behind))
            for name in options.served_model_names}
        self.vocab_sizes = {
            name: next((i.deployment.model.vocab_size for i in behind if name in i.served_model_names),
                       behind[0].deployment.model.vocab_size)
            for name in options.served_model_names}
        self.max_model_len = self.max_model_lens[self.model_name]  # the port's first model's
        self.tokenizer = tokenizers[self.model_name]  # the port's first model's
        sim = engine.sim  # does a request naming no model go to any model's instance? (see the module's docstring)
        self.any_model = instance is None and sim.entry == "any_non_decode" and all(
            tokenizers.get(i.served_model_names[0]) is self.tokenizer for i in sim.instances if i.role != "decode")
        self.max_token_id = max(*map(len, tokenizers.values()), *(i.deployment.model.vocab_size for i in behind)) - 1
        if options.skip_tokenizer_init:  # without a tokenizer vLLM bounds token ids by the model's vocabulary alone
            self.max_token_id = max(i.deployment.model.vocab_size for i in behind) - 1
        # a cluster's ports serve its instances' adapters: an instance's own, or the front door's view of them
        self.lora_adapters = options.lora_adapters or cluster_adapters(engine.sim, instance)
        self.lora_adapters.add_base_names(options.served_model_names)
        # the port's first model's defaults (vLLM's serving classes' default_sampling_params, override_max_tokens)
        self.default_sampling_params = self.sampling_defaults(None).params
        self.override_max_tokens = self.sampling_defaults(None).max_tokens_cap
        self.server_load = 0  # in-flight generation requests (/load, with --enable-server-load-tracking)

    # -- reading -------------------------------------------------------------------------
    async def read_body(self, request: web.Request, fields: Collection[str] | None = None) -> tuple[Any, float]:
        """The JSON body, and the virtual time at which it had arrived (read once per request).
        Raises UndecodableBody for a body that is not JSON.

        A large body keeps only `fields` at its top level and is decoded in a worker (see
        request_body.py): its arrival is stamped once decoded.
        """
        cached = request.get(_BODY)
        if cached is not None:
            return cached
        media_type = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
        if media_type != "application/json":
            raise schema_error(text="Unsupported Media Type: Only 'application/json' is allowed")
        data = await self.body_decoder.read(request, fields)
        request[_BODY] = result = (data, self.engine.pacer.virtual_now())
        return result

    async def read_json(self, request: web.Request, fields: Collection[str] | None = None) -> tuple[Any, float]:
        """`read_body`, with FastAPI's answers to a body it cannot decode: not JSON, a validation
        error at the decoder's position; any other failure (invalid UTF-8, nesting too deep, an
        integer of too many digits) an HTTPException(400)."""
        try:
            return await self.read_body(request, fields)
        except UndecodableBody as exc:
            raise (unparsable_body() if exc.position is None else invalid_json(exc.message, exc.position)) from None

    @staticmethod
    def parse(model: type[M], data: Any) -> M:
        if not isinstance(data, dict):  # FastAPI validates the body from attributes: its error, not pydantic's
            raise schema_error([{"type": "model_attributes_type", "loc": ("body",),
                                 "msg": "Input should be a valid dictionary or object to extract fields from",
                                 "input": data}])
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise from_pydantic(exc) from None

    def response_model(self, name: str | None) -> str:
        """The `model` of a response, as the vLLM pod serving it names it: its first served name (a
        cluster's front door: that of the instances serving the name asked for), or the adapter it ran with."""
        if self.lora_adapters.get(name) is not None:
            return name
        instances = self.engine.sim.by_model.get(name) if name and self.instance is None else None
        return instances[0].served_model_names[0] if instances and len(self.engine.sim.instances) > 1 \
            else self.model_name

    def cache_creation_tokens(self, job: Job) -> int:
        """vLLM's num_cache_creation_tokens of a job's first request (its PrefillStats.finalize): the prompt
        tokens its prefill put in the prefix cache (its full blocks, when its first token came out) less
        those it did not compute; 0 without prefix caching, or before a first token."""
        request = job.choices[0].request if job.choices else None
        if request is None or request.first_token_time is None or request.engine_index is None:
            return 0
        config = self.engine.sim.engines[request.engine_index].config
        if not config.enable_prefix_caching:
            return 0
        hashed = request.num_prompt_tokens // config.block_size * config.block_size
        return max(0, hashed - request.num_prompt_tokens_not_computed)

    def max_model_len_for(self, model: str | None) -> int:
        """The context of the model a request names (the port's first model's when it names none; for a
        request that goes to any model's instance, the longest of those up: the core routes it to one that
        holds it)."""
        if model:
            return self.max_model_lens.get(model, self.max_model_len)
        if self.any_model:
            return max((i.deployment.config.max_model_len for i in self.engine.sim.candidates(None)),
                       default=self.max_model_len)
        return self.max_model_len

    def routed_model(self, model: str | None) -> str | None:
        """The model the core is told a request is for: its base model; None for one that goes to any model's
        instance; else the port's first model (vLLM's for a request naming none)."""
        return self.base_model(model) or (None if self.any_model else self.model_name)

    def vocab_size_for(self, model: str | None) -> int:
        """The vocabulary size of the model a request names (its config's, as vLLM's get_vocab_size)."""
        return self.vocab_sizes.get(model, self.vocab_sizes[self.model_name]) if model else \
            self.vocab_sizes[self.model_name]

    def sampling_defaults(self, model: str | None) -> SamplingDefaults:
        """The default sampling parameters of the model a request names (an adapter: its base model's; none,
        or one this port does not serve: the port's first model's), from its generation config."""
        defaults = self.options.sampling_defaults
        return defaults.get(self.base_model(model) or self.model_name) or defaults.get(self.model_name) or \
            _NO_DEFAULTS

    def lora_of(self, name: str | None) -> LoRAAdapter | None:
        """The adapter a request's `model` names (None: a base model, or none)."""
        return self.lora_adapters.get(name)

    def base_model(self, name: str | None) -> str | None:
        """The served model a request runs on: its own name, or its adapter's base model."""
        adapter = self.lora_adapters.get(name)
        return name if adapter is None else adapter.base_model_name or self.model_name

    def check_model(self, name: str | None, logged: bool = False) -> None:
        """vLLM's _check_model: a served name or a loaded adapter (with runtime LoRA updating, vLLM also asks
        its LoRA resolvers, of which none is installed here), else its 404. `logged`: with the ERROR line the
        route then writes (vLLM's chat, Responses, generate and render routes do; completions and tokenize
        do not): "Error with model" and the ErrorResponse's repr."""
        if name and name not in self.options.served_model_names and self.lora_adapters.get(name) is None:
            if runtime_updating():
                self.lora_adapters.resolve_unknown()
            error = not_found(model_not_found(name, self.options.served_model_names), param="model")
            if logged:
                log.error("Error with model %s", f"error=ErrorInfo(message={error.message!r}, "
                          f"type={error.err_type!r}, param={error.param!r}, code={error.status})")
            raise error

    def check_admission(self, request: web.Request, n: int, model: str | None) -> None:
        """vLLM's queue limits (503 past them), as the pod this port is applies them: an instance's
        own port counts a refusal on its own /metrics; the front door and a single deployment's
        ports on the server's."""
        self.engine.check_admission(n, self.routed_model(model), self.instance, self.admission_observers(request))

    @contextlib.contextmanager
    def kv_transfer_rejection_cleanup(self, request: web.Request, req) -> Iterator[None]:
        """vLLM's _with_kv_transfer_rejection_cleanup around a parsed chat, completion or Responses request `req` whose
        kv_transfer_params load a prefill's KV: if the route fails (a 404, a 503 at a queue bound, a 400, a
        non-streamed request that ends in an error or whose client leaves: vLLM's route then answers an
        ErrorResponse too), the engine client frees the prefill's blocks unread. A stream that has opened
        is vLLM's returned generator: what fails after that frees nothing here."""
        params = req.kv_transfer_params
        if not isinstance(params, dict) or not params.get("do_remote_prefill"):
            yield
            return
        try:
            yield
        except BaseException:
            if not request.get(STREAM_OPENED, False):
                self.engine.kv_transfer_rejected(params, self.routed_model(req.model), self.instance)
            raise

    def admission_observers(self, request: web.Request) -> list | None:
        """Who counts this port's refusals: an instance's own port its own /metrics; the front door and a single
        deployment's ports the server's (None: the engine client's observers)."""
        return [request.app[METRICS]] if self.instance is not None else None

    # -- headers -------------------------------------------------------------------------
    @staticmethod
    def base_request_id(request: web.Request, body_id: str) -> str:
        header = request.headers.get("X-Request-Id")
        if header is None:
            return body_id
        # aiohttp decodes header bytes as UTF-8 with surrogate escapes; Starlette (so vLLM) as Latin-1
        return header.encode("utf-8", "surrogateescape").decode("latin-1")

    def pinned_engine(self, request: web.Request) -> int | None:
        """`X-data-parallel-rank`: a router's choice of engine (a pod has one, rank 0). A cluster's front door
        checks it once the request's model is known (`forwarded_rank`)."""
        text = request.headers.get("X-data-parallel-rank")
        rank = None
        if text is not None:
            try:
                rank = int(text)
            except ValueError:
                pass
        if self.pod is not None:
            num_ranks = 1
        elif self.instance is not None:
            num_ranks = len(self.instance.engines)
        elif len(self.engine.sim.instances) == 1:
            num_ranks = self.engine.num_engines
        else:
            return rank
        if rank is not None and not 0 <= rank < num_ranks:
            raise validation_error(f"data_parallel_rank {rank} is out of range [0, {num_ranks}).")
        return self.pod if self.pod is not None else rank

    def forwarded_rank(self, rank: int | None, model: str | None) -> int | None:
        """The X-data-parallel-rank a cluster's front door passes on for a request of `model`: none through the
        cluster's own P/D proxy (vLLM's toy proxy sends its prefill and decode pods Authorization and X-Request-Id
        alone, so no value is refused either), else the pod's rank check (a pod of one rank)."""
        if rank is None or self.instance is not None or self.pod is not None or len(self.engine.sim.instances) == 1:
            return rank
        sim = self.engine.sim
        if sim.entry == "by_role" and sim.pd.serves(self.routed_model(model)):
            return None
        if rank != 0:
            raise validation_error(f"data_parallel_rank {rank} is out of range [0, 1).")
        return rank

    @staticmethod
    def priority(request: web.Request, body_priority: int) -> int:
        text = request.headers.get("X-Vllm-Priority")
        if text is not None:
            try:
                return int(text)
            except ValueError:
                pass
        return body_priority

    # -- prompts -------------------------------------------------------------------------
    def check_max_tokens(self, value: int | None, param: str, model: str | None = None) -> None:
        """vLLM's TokenizeParams check, before tokenizing."""
        max_model_len = self.max_model_len_for(model)
        if value is not None and value > max_model_len:
            raise validation_error(f"{param}={value} cannot be greater than max_model_len={max_model_len}. "
                                   "Please request fewer output tokens.", parameter=param, value=value)

    def tokenizer_for(self, model: str | None) -> Tokenizer:
        """The tokenizer of the model a request names (the port's first model's when it names none). The
        emulator keeps one even with --skip-tokenizer-init: it draws the output's token ids from it."""
        return self.tokenizers.get(model, self.tokenizer) if model else self.tokenizer

    @property
    def has_tokenizer(self) -> bool:
        """Whether vLLM's front end would have a tokenizer (not with --skip-tokenizer-init or --tokens-only)."""
        return not self.options.skip_tokenizer_init

    def kept_eos_text(self, req, model: str | None, params: Callable[[int], SamplingParams] | None) -> str:
        """The text a final EOS adds to an output: vLLM's detokenizer decodes a stop token only with
        include_stop_str_in_output, and shows a special one only where special tokens are not skipped (the
        request's skip_special_tokens, else its model's default; or its tool or reasoning parser's: `params`,
        server/tool_calls.py)."""
        if not req.include_stop_str_in_output:
            return ""
        return self.special_eos_text(req, model, params)

    def special_eos_text(self, req, model: str | None, params: Callable[[int], SamplingParams] | None) -> str:
        """The EOS token's text where an output shows special tokens (as `kept_eos_text` decides), else "": what
        an EOS adds that stops nothing (ignore_eos), which vLLM's detokenizer decodes as any other token."""
        if not self.has_tokenizer:
            return ""
        skip = req.skip_special_tokens
        if skip is None:
            skip = self.sampling_defaults(model).params.get("skip_special_tokens", True)
        if params(0).skip_special_tokens if params is not None else skip:
            return ""
        tokenizer = self.tokenizer_for(model)
        return tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)

    def require_tokenizer(self, model: str | None) -> Tokenizer:
        """`tokenizer_for`, where vLLM needs its tokenizer (to tokenize, decode, render a chat): without one,
        its 400."""
        if not self.has_tokenizer:
            raise tokenizer_unavailable()
        return self.tokenizer_for(model)

    def check_truncation(self, truncate: int | None, model: str | None = None) -> None:
        """vLLM's TokenizeParams check of truncate_prompt_tokens, before tokenizing."""
        max_model_len = self.max_model_len_for(model)
        if truncate is not None and truncate > max_model_len:
            raise validation_error(f"truncate_prompt_tokens={truncate} cannot be greater than max_model_len = "
                                   f"{max_model_len}. Please request a smaller truncation size.",
                                   parameter="truncate_prompt_tokens", value=truncate)

    def truncation_length(self, truncate: int | None, model: str | None, output_room: bool = True) -> int | None:
        """The prompt length truncate_prompt_tokens keeps: -1 is the context less one token for the output
        (the whole context when no output is asked for, as an echo-only completion)."""
        if truncate is None or truncate >= 0:
            return truncate
        max_model_len = self.max_model_len_for(model)
        return max(0, max_model_len - 1) if output_room else max_model_len

    def encode_text(self, text: str, add_special_tokens: bool, model: str | None = None, truncate: int | None = None,
                    side: str | None = None) -> list[int]:
        """A text prompt's token ids, checked and truncated as vLLM's renderer does: without truncation
        the tokenizer stops one token past the context (so an over-long prompt "contains at least"
        max_model_len + 1 tokens); with `truncate` (a length, see truncation_length) it keeps the last
        tokens, after the BOS the tokenizer adds, or, with an explicit truncation `side`, slices that side
        of the whole sequence."""
        tokenizer = self.require_tokenizer(model)
        max_model_len = self.max_model_len_for(model)
        limit_chars = max_model_len * tokenizer.max_chars_per_token
        if truncate is None and len(text) > limit_chars:
            raise validation_error(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                f"contains {len(text)} characters (more than {limit_chars} characters, which is the upper bound "
                f"for {max_model_len} input tokens). Please reduce the length of the input prompt.",
                parameter="input_text", value=len(text))
        if truncate is not None and side is not None and len(text) > limit_chars:
            text = text[-limit_chars:] if side == "left" else text[:limit_chars]
        try:
            text.encode()
        except UnicodeEncodeError as exc:  # a lone surrogate: vLLM's tokenizer fails on it (a ValueError: 400)
            raise APIError(str(exc)) from None
        ids = tokenizer.encode(text, add_special_tokens)
        keep = max_model_len + 1 if truncate is None else truncate
        if side is None and len(ids) > keep:  # the tokenizer's own truncation (left): special tokens stay
            special = 1 if add_special_tokens and ids and ids[0] == tokenizer.bos_token_id else 0
            ids = ids[:special] + ids[len(ids) - max(keep - special, 0):] if keep > special else ids[:keep]
        return self.check_prompt_length(truncated(ids, truncate, side), model)

    def check_prompt_length(self, ids: list[int], model: str | None = None) -> list[int]:
        max_model_len = self.max_model_len_for(model)
        if len(ids) > max_model_len:
            # vLLM's tokenizer stops at max_model_len + 1 tokens: that many may be more
            qualifier = "at least " if len(ids) == max_model_len + 1 else ""
            raise validation_error(
                f"This model's maximum context length is {max_model_len} tokens. However, your prompt "
                f"contains {qualifier}{len(ids)} input tokens, which exceeds this limit even without any output "
                "tokens. Please reduce the length of the input prompt.", parameter="input_tokens", value=len(ids))
        if not ids:
            raise validation_error("The decoder prompt cannot be empty")
        return ids

    def max_tokens_for(self, prompt_len: int, requested: int | None, model: str | None = None) -> int:
        """vLLM's get_max_tokens: what still fits in max_model_len, capped by the request's max_tokens (else
        by its model's default max_tokens, a generation config's max_new_tokens) and by the configured cap."""
        room = self.max_model_len_for(model) - prompt_len
        defaults = self.sampling_defaults(model)
        fallback = requested if requested is not None else defaults.params.get("max_tokens")
        return min(limit for limit in (room, fallback, defaults.max_tokens_cap) if limit is not None)

    def check_token_ids(self, ids: list[int]) -> None:
        """A token-id prompt must stay inside the model's (or the tokenizer's) vocabulary."""
        if ids and max(ids) > self.max_token_id:
            raise validation_error(f"Token id {max(ids)} is out of vocabulary")

    def logprob_source(self, model: str | None = None, as_token_ids: bool | None = None) -> LogprobSource:
        """Synthetic logprobs in the model's tokens; `as_token_ids`: the request's
        return_tokens_as_token_ids (None: --return-tokens-as-token-ids decides)."""
        if as_token_ids is None:
            as_token_ids = self.options.return_tokens_as_token_ids
        decode = self.decoder(model)
        return LogprobSource([i for i, _ in self.tokenizer_for(model).output_pool], lambda i: decode([i]), as_token_ids)

    def decoder(self, model: str | None) -> Callable[[list[int]], str]:
        """Token ids to text as vLLM's tokenizer.decode gives it by default: special tokens kept (a gpt-oss model's
        Harmony markers by name, whichever tokenizer has its words)."""
        tokenizer = self.tokenizer_for(model)
        if uses_harmony(self, model):
            return harmony_tokens(tokenizer).decode
        return functools.partial(tokenizer.decode, skip_special_tokens=False)

    def structure_for(self, req, model: str | None = None,
                      constraint: Constraint | None = None) -> StructuredText | None:
        """What a request's output must satisfy (its structured outputs, or `constraint` when given), as
        the texts of the model's tokenizer; None for plain words (also for a grammar or structural tag,
        which are not interpreted)."""
        if constraint is None:
            constraint = constraint_of(req.structured_outputs, req.response_format)
        if constraint is None or constraint.kind not in INTERPRETED:
            return None
        tokenizer = self.tokenizer_for(model)
        return StructuredText(constraint, tokenizer, [text for _, text in tokenizer.output_pool])

    async def generate(self, request: web.Request, req, fmt: ChunkFormat, prompts: list[list[int]],
                       request_ids: list[str], n: int, max_tokens: list[int], arrival: float,
                       pinned: int | None, reply: bool = False, model: str | None = None,
                       structure: StructuredText | None = None, channel: SSEChannel | None = None,
                       priority_header: bool = True, params: Callable[[int], SamplingParams] | None = None,
                       logged_as: tuple[str, str] | None = None,
                       prompt_texts: Sequence[str | None] | None = None,
                       extra_args: dict | None = None,
                       thinking: ThinkingPlan | None = None,
                       skip_reading_prefix_cache: bool | None = None) -> tuple[Job, web.StreamResponse | None]:
        """Run one API request's engine requests to the end: streamed through `fmt` when `req.stream`
        (the finished SSE response is returned), else collected in the job. A cancelled handler (the
        client went away) aborts them in the core.

        The stream opens only once the engine has taken the request: one it refuses (no instance of
        its model up: 503) is answered with a JSON error, as a request that does not stream is. Through the
        cluster's own P/D proxy it opens once the prefill pod has answered (vLLM's toy proxy sends its client
        the headers then): a failed prefill is answered with its HTTP error too.
        `thinking`: a chat reply's reasoning markup (server/reasoning.py), planned into each choice's output.
        `channel`: the stream's own, when the caller has one (the Responses API's, which holds the
        events that open its stream, or keeps a background response's events for later readers).
        `priority_header`: X-Vllm-Priority overrides the body's priority (vLLM's chat, completions and
        Responses routes read it; generate and batch chat do not).
        `params`: builds the SamplingParams vLLM's route builds for prompt p, for --enable-log-requests
        (called only when logged); None: those of a chat or completion `req`. `prompt_texts`: each prompt's
        text as vLLM's engine input keeps it, for its DEBUG line (None: none). `logged_as`: the route and the
        response id its outputs are logged under with --enable-log-outputs (see request_log.py; a stream of
        chat or completion chunks logs each as vLLM's "(streaming delta)" line); None: a chat or completion
        `req`'s, under its first engine request's id (a completion's without "-0"). `extra_args`: the generate
        route's sampling_params.extra_args (None: a chat or completion `req`'s vllm_xargs).
        `skip_reading_prefix_cache`: the generate route's sampling_params field (None: a chat or completion
        `req` sets it as vLLM's SamplingParams does, when it asks for prompt logprobs)."""
        if not req.stream:
            channel = None
        elif channel is None:
            channel = SSEChannel(request)
        interval = max(req.stream_interval or 1, self.options.stream_interval) if req.stream else 1
        logger = self.options.request_logger
        if logged_as is None:  # a completion's engine requests are "<id>-<prompt index>": vLLM logs <id>
            completion = isinstance(req, CompletionRequest)
            first_id = request_ids[0] if request_ids else ""
            logged_as = ("completion", first_id[:-2]) if completion and first_id.endswith("-0") else \
                ("completion" if completion else "chat", first_id)
        if channel is not None and logger is not None and logger.logs_deltas(logged_as[0]):
            fmt = DeltaLogging(fmt, logger, logged_as[1])
        job = Job(prompts, channel, fmt, interval)
        if not self.has_tokenizer and constraint_of(getattr(req, "structured_outputs", None),
                                                    getattr(req, "response_format", None)) is not None:
            error = structured_outputs_need_tokenizer()  # vLLM's engine refuses it as it takes the request
            if channel is None:
                raise error
            channel.send(streaming_error(error) + DONE)  # in vLLM the stream was open: its error event
            await channel.open()
            await channel.close()
            return job, channel.response
        # without a tokenizer vLLM's detokenizer is a no-op: no text, and stop strings never match
        rules = StopRules(req.ignore_eos, req.min_tokens, req.stop_strings(), tuple(req.stop_token_ids or ()),
                          req.include_stop_str_in_output, structure, detokenize=self.has_tokenizer,
                          eos_text=self.kept_eos_text(req, model, params), thinking=thinking,
                          special_eos_text=self.special_eos_text(req, model, params) if req.ignore_eos else "")
        priority = self.priority(request, req.priority) if priority_header else req.priority
        lora = self.lora_of(model)
        defaults = self.sampling_defaults(model).params

        def log_inputs() -> None:  # vLLM's _log_inputs of every prompt, before its engine is given any
            if logger is not None:
                for p, (request_id, prompt) in enumerate(zip(request_ids, prompts)):
                    logged = functools.partial(params, p) if params is not None else \
                        functools.partial(logged_params, req, max_tokens[p], defaults)
                    logger.inputs(request_id, prompt_texts[p] if prompt_texts is not None else None, prompt, logged,
                                  lora)
        try:
            self.engine.start(job, request_ids, n, max_tokens, rules, seed=req.seed, priority=priority,
                              arrival=arrival, pinned_engine=self.forwarded_rank(pinned, model),
                              model=self.routed_model(model), instance=self.instance,
                              session=request.headers.get("X-Session-Id") or req.user,
                              session_id=vllm_session_id(req, request.headers),
                              kv_cache_report_mode=kv_cache_report_mode(
                                  getattr(req, "vllm_xargs", None) if extra_args is None else extra_args),
                              kv_transfer_params=req.kv_transfer_params, cache_salt=getattr(req, "cache_salt", None),
                              reply=reply, lora=lora, observers=self.admission_observers(request),
                              sampling=Sampling.of(req, defaults),  # greedy, seeded outputs follow them
                              skip_reading_prefix_cache=asks_prompt_logprobs(req) if skip_reading_prefix_cache is None
                              else skip_reading_prefix_cache)
        except PromptRefused as error:  # AsyncLLM refused a later prompt: in vLLM the stream had begun
            log_inputs()  # (its lazy generators: every prompt was logged before the first was added)
            if logger is not None:  # AsyncLLM's lines: those before it added, it refused, the others aborted
                added = [choice for choice in job.choices if choice.prompt_index < error.prompt]
                for choice in added:
                    logger.added(choice.request.request_id)
                logger.refused(request_ids[error.prompt], error.message)
                for engine_id, request_id in prompt_engine_ids(added, request_ids):
                    logger.aborted(engine_id, request_id)
            if channel is None or (self.instance is None and self.engine.sim.pd.serves(self.routed_model(model))):
                raise  # (through the cluster's own P/D proxy: the prefill pod's plain 503, which a proxy relays)
            log.error("Error in completion stream generator.")  # vLLM's line (with the exception's traceback)
            channel.send(streaming_error(error) + DONE)
            await channel.open()
            await channel.close()
            return job, channel.response
        except GenerationPaused as error:  # vLLM's engine took it and answered its error: a stream had begun
            log_inputs()
            if logger is not None:
                for choice in job.choices:
                    logger.added(choice.request.request_id)
            if channel is None or (self.instance is None and self.engine.sim.pd.serves(self.routed_model(model))):
                raise  # (through the cluster's own P/D proxy: the prefill pod's 503, which the proxy relays)
            channel.send(streaming_error(error) + DONE)  # (a GenerationError: vLLM's stream generator logs nothing)
            await channel.open()
            await channel.close()
            return job, channel.response
        log_inputs()
        if logger is not None:
            for choice in job.choices:
                logger.added(choice.request.request_id)
        first = job.choices[0].request if job.choices else None
        if self.instance is None and first is not None and first.engine_index is not None:
            request[FORWARDED_TO] = self.engine.sim.instance_of[first.engine_index].name  # the pod it went to
        if first is not None and not model and self.any_model:  # it takes the model of the instance it went to
            placed = self.engine.sim.pd.prefill_of.get(first.request_id, first)  # (entered at a prefill instance)
            req.model = self.engine.sim.instance_of[placed.engine_index].served_model_names[0]
        try:
            if channel is not None and self.instance is None and first is not None and self.engine.sim.pd.in_prefill(
                    first):  # through the cluster's own P/D proxy: vLLM's toy proxy answers the client (its
                if not await job.wait_for_prefill_answer():  # headers) once the prefill pod has answered, so
                    channel = None  # that pod's error is an HTTP error
            if channel is not None:
                request[STREAM_OPENED] = True
                await channel.open()  # what the engine delivers meanwhile waits in the channel
            await job.wait()
        except BaseException:  # cancelled (the client went away), or its stream could not open
            self.abort(job, request_ids)
            raise
        if channel is None:
            if any(choice.finish_reason == "error" for choice in job.choices):
                if job.error is not None:  # a pod's own answer (the cluster's P/D proxy relays it)
                    raise job.error
                log.error("Request %s failed with an internal error during generation", request_ids[0])
                raise internal_error()
            self._log_outputs(job, logged_as, streaming=False)
            return job, None
        if job.noted:  # its last chunk is not written yet (a delivery set for the loop's next turn): first
            job.deliver(late=False)
        job.finish_stream()
        await channel.close()
        self._log_outputs(job, logged_as, streaming=True)
        return job, channel.response

    def abort(self, job: Job, request_ids: Sequence[str]) -> None:
        """Abort the job's requests still running (each prompt's `request_ids`: the route's), with AsyncLLM's
        lines for each prompt whose requests had not all finished."""
        logger = self.options.request_logger
        if logger is not None:
            running = [choice for choice in job.choices if not choice.request.is_finished]
            for engine_id, request_id in prompt_engine_ids(running, request_ids):
                logger.aborted(engine_id, request_id)
        self.engine.abort(job)

    def _log_outputs(self, job: Job, logged_as: tuple[str, str], streaming: bool) -> None:
        """--enable-log-outputs: each choice's output as vLLM's route logs it."""
        logger = self.options.request_logger
        if logger is None or not logger.log_outputs:
            return
        route, response_id = logged_as
        for choice in job.choices:
            if choice.request is not None:
                produced = choice.request.num_output_tokens
                text = "".join(choice.plan.pieces[:produced]) if self.has_tokenizer else ""
                if not streaming:  # the route's own account of the choice (a chat's tool calls)
                    text = job.format.logged_output(choice, text)
                logger.outputs(route, response_id, text, choice.plan.token_ids[:produced].tolist(),
                               choice.finish_reason, streaming)


_NO_DEFAULTS = SamplingDefaults()
SERVING = web.AppKey("serving", Serving)  # the port's Serving, on its aiohttp app
FORWARDED_TO = web.RequestKey("forwarded_to", str)  # on a front door's request: the instance it went to
STREAM_OPENED = web.RequestKey("stream_opened", bool)  # its stream is open (the engine has taken the request)


def prompt_engine_ids(choices: Sequence[Choice], request_ids: Sequence[str]) -> list[tuple[str, str]]:
    """(engine id, route's id) of each prompt the choices belong to, in order: the engine id as AsyncLLM
    names the prompt's request (for n > 1 the parent's: its children's ids less their "<index>_")."""
    out: dict[int, tuple[str, str]] = {}
    for choice in choices:
        if choice.prompt_index not in out:
            engine_id = choice.request.request_id
            if choice.client_request_id != request_ids[choice.prompt_index]:  # a child: "<index>_<parent>"
                engine_id = engine_id.split("_", 1)[1]
            out[choice.prompt_index] = (engine_id, request_ids[choice.prompt_index])
    return list(out.values())


def asks_prompt_logprobs(req) -> bool:
    """Whether a chat or completion request asks for prompt logprobs, as vLLM's to_sampling_params
    decides (echo asks for them with the request's top_logprobs, a chat's 0 by default, or a completion's
    logprobs): its SamplingParams then skip reading the prefix cache."""
    prompt_logprobs = getattr(req, "prompt_logprobs", None)
    if prompt_logprobs is None and getattr(req, "echo", False):
        prompt_logprobs = req.top_logprobs if isinstance(req, ChatCompletionRequest) else getattr(req, "logprobs", None)
    return prompt_logprobs is not None


def logged_params(req, max_tokens: int, defaults: dict | None = None) -> SamplingParams:
    """The SamplingParams vLLM's chat or completion route builds from `req` for a prompt of `max_tokens`
    (a chat with a forced call passes its own: server/chat.py chat_params); `defaults`: its model's default
    sampling parameters (Serving.sampling_defaults)."""
    if isinstance(req, ChatCompletionRequest):
        return from_chat(req, max_tokens, defaults=defaults)
    return from_completion(req, max_tokens, defaults)


def truncated(ids: list[int], truncate: int | None, side: str | None) -> list[int]:
    """vLLM's token truncation: keep `truncate` tokens, the last ones unless `side` is "right"."""
    if truncate is None or truncate >= len(ids):
        return ids
    if truncate == 0:
        return []
    return ids[:truncate] if side == "right" else ids[-truncate:]


def json_body(body: dict) -> web.Response:
    return json_response(body)


def per_request_metrics(request) -> dict:
    """vLLM's `metrics` object (--enable-per-request-metrics), from the request's virtual timestamps."""
    out = dict.fromkeys(("time_to_first_token_ms", "generation_time_ms", "queue_time_ms", "mean_itl_ms",
                         "tokens_per_second"))
    scheduled, first, last = request.scheduled_time, request.first_token_time, request.last_token_time
    generated = request.num_output_tokens
    if scheduled is not None and first is not None:
        out["time_to_first_token_ms"] = (first - scheduled) * 1000
    if first is not None and last is not None:
        out["generation_time_ms"] = (last - first) * 1000
        if generated > 1:
            out["mean_itl_ms"] = (last - first) / (generated - 1) * 1000
    if request.queued_time is not None and scheduled is not None:
        out["queue_time_ms"] = (scheduled - request.queued_time) * 1000
    if scheduled is not None and last is not None and last > scheduled:
        out["tokens_per_second"] = generated / (last - scheduled)
    out["speculative_decoding"] = None
    return out


def auth_error() -> web.Response:
    """vLLM's API-key middleware answers with its own, shorter shape."""
    return json_response({"error": "Unauthorized"}, 401)
