"""Logging as `vllm serve` sets it up: vLLM's loggers (vllm/logger.py, vllm/config/logging.py) and uvicorn's
(its LOGGING_CONFIG, as vLLM runs it: vllm/entrypoints/launchers/utils/server_utils.py).

vLLM's lines go to stdout ($VLLM_LOGGING_STREAM) as
`(APIServer pid=1234) INFO 12-07 04:16:14 [serve.py:530] message` (a message's further lines carry the same
prefix; colours on a terminal, as $VLLM_LOGGING_COLOR, NO_COLOR and FORCE_COLOR say; at DEBUG the file is
its path in the project), at --log-level, else $VLLM_LOGGING_LEVEL, else INFO; the emulator's own loggers
(`vllm_emulator.*`) log the same way. uvicorn's: its server lines (`INFO:     Application startup
complete.`) to stderr, its access log (`INFO:     127.0.0.1:52314 - "POST /v1/completions HTTP/1.1" 200 OK`)
to stdout, at --uvicorn-log-level, without the paths of --disable-access-log-for-endpoints.
--logging-config (JSON, or dotted: --logging-config.formatter json) sets log_level, formatter (text or json:
one JSON object a line, both vLLM's and uvicorn's), configure_logging and pylogging_config_file; --log-level
and the legacy --log-config-file override its fields. A Python logging config file (JSON, dictConfig schema;
$VLLM_LOGGING_CONFIG_PATH by default) replaces all of it, vLLM's and uvicorn's; vLLM's and uvicorn's formatter
classes named in it are these. VLLM_CONFIGURE_LOGGING=0 leaves logging as it is.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import http
import json
import logging
import logging.config
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

# vLLM's LoggingConfig.log_level values, and uvicorn's levels (its "trace" is 5, below DEBUG)
LOG_LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG", "NOTSET")
UVICORN_LOG_LEVELS = {"critical": logging.CRITICAL, "error": logging.ERROR, "warning": logging.WARNING,
                      "info": logging.INFO, "debug": logging.DEBUG, "trace": 5}
PROCESS_NAME = "APIServer"  # what vLLM's API server process calls itself in its lines (decorate_logs)
_process = [PROCESS_NAME]  # the process a line is from: the engine core's lines are said by it (as_process)
DATE_FORMAT = "%m-%d %H:%M:%S"
JSON_FIELDS = ("asctime", "levelname", "name", "processName", "process", "message")  # vLLM's JSON_FORMAT
ACCESS = "uvicorn.access"
SERVER = "uvicorn.error"
ROOT = Path(__file__).resolve().parents[1]  # the project: a DEBUG line's file is named from here
_ANSI = {"bold": "1", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35", "cyan": "36",
         "white": "37", "grey": "90", "bright_red": "91", "bright_white": "97"}


def _style(text: str, colour: str) -> str:
    return f"\033[{_ANSI[colour]}m{text}\033[0m"


def _process_name(factory: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    """vLLM's record factory: every record knows the process it came from (`vllm_process_name`)."""
    def make(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.vllm_process_name = _process[-1]
        return record
    make.vllm_process_name = True  # type: ignore[attr-defined]
    return make


@contextlib.contextmanager
def as_process(name: str):
    """Lines logged inside are from vLLM's process `name` (the engine core's start-up lines: "EngineCore",
    "EngineCore_DP0" with data parallelism), as vLLM's engine core process logs them."""
    _process.append(name)
    try:
        yield
    finally:
        _process.pop()


def _name_processes(factory: Callable[..., logging.LogRecord]) -> None:
    """Install vLLM's record factory (once: a factory of ours is not wrapped again)."""
    if not getattr(factory, "vllm_process_name", False):
        logging.setLogRecordFactory(_process_name(factory))


class VllmFormatter(logging.Formatter):
    """vLLM's NewLineFormatter: `[file:line]`, with the file's path (shortened as vLLM's) at DEBUG; a message's
    further lines start with the line's prefix. Also accepts vLLM's `log_level` keyword."""

    def __init__(self, fmt=None, datefmt=None, style="%", *, log_level: str | None = None) -> None:
        super().__init__(fmt, datefmt, style)
        self.use_relpath = log_level == "DEBUG"

    def format(self, record: logging.LogRecord) -> str:
        record.fileinfo = _short_path(record) if self.use_relpath else record.filename
        if not hasattr(record, "vllm_process_name"):
            record.vllm_process_name = record.processName
        text = super().format(record)
        if record.message:
            prefix = text.split(record.message)[0]
            text = text.replace("\n", "\r\n" + prefix)
        return text


class VllmColoredFormatter(VllmFormatter):
    """vLLM's ColoredFormatter: the process in cyan, the level in its colour, time and file in grey."""
    LEVELS = {"DEBUG": "white", "INFO": "green", "WARNING": "yellow", "ERROR": "red", "CRITICAL": "magenta"}

    def __init__(self, fmt=None, datefmt=None, style="%", *, log_level: str | None = None) -> None:
        if fmt:
            fmt = fmt.replace("(%(vllm_process_name)s pid=%(process)d)",
                              "\033[0;36m(%(vllm_process_name)s pid=%(process)d)\033[0;0m")
            fmt = fmt.replace("%(asctime)s", "\033[90m%(asctime)s\033[0m")
            fmt = fmt.replace("[%(fileinfo)s:%(lineno)d]", "\033[90m[%(fileinfo)s:%(lineno)d]\033[0m")
        super().__init__(fmt, datefmt, style, log_level=log_level)

    def format(self, record: logging.LogRecord) -> str:
        levelname = record.levelname
        if levelname in self.LEVELS:
            record.levelname = _style(levelname, self.LEVELS[levelname])
        try:
            return super().format(record)
        finally:
            record.levelname = levelname


def _short_path(record: logging.LogRecord) -> str:
    """vLLM's shrink_path: the file's path in the project, `first/.../last two` when longer."""
    try:
        parts = list(Path(record.pathname).resolve().relative_to(ROOT).parts)
    except (ValueError, OSError):
        return record.filename
    head = parts[:1]
    rest = parts[1:]
    return "/".join(head + (["..."] + rest[-2:] if len(rest) > 2 else rest))


class UvicornFormatter(logging.Formatter):
    """uvicorn's DefaultFormatter: `%(levelprefix)s` is the level, a colon and padding to nine characters."""
    LEVELS = {5: "blue", logging.DEBUG: "cyan", logging.INFO: "green", logging.WARNING: "yellow",
              logging.ERROR: "red", logging.CRITICAL: "bright_red"}

    def __init__(self, fmt=None, datefmt=None, style="%", use_colors: bool | None = None) -> None:
        self.use_colors = use_colors if use_colors in (True, False) else sys.stdout.isatty()
        super().__init__(fmt=fmt, datefmt=datefmt, style=style)

    def formatMessage(self, record: logging.LogRecord) -> str:
        record = copy.copy(record)
        levelname = record.levelname
        separator = " " * (8 - len(levelname))
        if self.use_colors and record.levelno in self.LEVELS:
            levelname = _style(levelname, self.LEVELS[record.levelno])
        record.__dict__["levelprefix"] = levelname + ":" + separator
        self._fields(record)
        return super().formatMessage(record)

    def _fields(self, record: logging.LogRecord) -> None:
        pass


class UvicornAccessFormatter(UvicornFormatter):
    """uvicorn's AccessFormatter: `client_addr`, `request_line` and `status_code` (with its phrase)."""
    STATUS = {1: "bright_white", 2: "green", 3: "yellow", 4: "red", 5: "bright_red"}

    def _fields(self, record: logging.LogRecord) -> None:
        client_addr, method, full_path, http_version, status_code = record.args  # type: ignore[misc]
        try:
            phrase = http.HTTPStatus(int(status_code)).phrase
        except ValueError:
            phrase = ""
        status = f"{status_code} {phrase}"
        request_line = f"{method} {full_path} HTTP/{http_version}"
        if self.use_colors:
            status = _style(status, self.STATUS.get(int(status_code) // 100, "bold"))
            request_line = _style(request_line, "bold")
        record.__dict__.update(client_addr=client_addr, request_line=request_line, status_code=status)


class JsonFormatter(logging.Formatter):
    """`--logging-config.formatter json`: one JSON object a line with vLLM's fields (its JSON_FORMAT, as
    python-json-logger writes them), and the traceback where there is one."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        record.asctime = self.formatTime(record, self.datefmt)
        out = {name: getattr(record, name) for name in JSON_FIELDS}
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class AccessLogFilter(logging.Filter):
    """vLLM's UvicornAccessLogFilter (--disable-access-log-for-endpoints): no access line for these paths
    (matched exactly, the query left out)."""

    def __init__(self, excluded_paths: list[str] | None = None) -> None:
        super().__init__()
        self.excluded_paths = set(excluded_paths or [])

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.excluded_paths or record.name != ACCESS:
            return True
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            return urlparse(record.args[2]).path not in self.excluded_paths
        return True


class StandardStream(logging.StreamHandler):
    """A StreamHandler on sys.stdout or sys.stderr as they are when a line is written (`ext://sys.stdout`,
    looked up per line, so a replaced sys.stdout -- a test's capture -- is followed, not kept when closed)."""

    def __init__(self, which: str = "stdout") -> None:
        super().__init__()
        self.stream_name = which

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value) -> None:
        pass  # logging.StreamHandler.__init__ sets it; the stream is looked up per line


# vLLM's start-up banner (vllm/entrypoints/common/startup.py log_version_and_model): w bold, o orange, b blue
_BANNER = ("\n       {w}█     █     █▄   ▄█{r}\n"
           " {o}▄▄{r} {b}▄█{r} {w}█     █     █ ▀▄▀ █{r}  version {w}%s{r}\n"
           "  {o}█{r}{b}▄█▀{r} {w}█     █     █     █{r}  model   {w}%s{r}\n"
           "   {b}▀▀{r}  {w}▀▀▀▀▀ ▀▀▀▀▀ ▀     ▀{r}\n")
_BANNER_COLOURS = {"w": "\033[1m", "o": "\033[93m", "b": "\033[94m", "r": "\033[0m"}


def formatter_type(logger: logging.Logger) -> str | None:
    """vLLM's current_formatter_type: "color" or "newline" where the logger's lines go through vLLM's own
    handler (named "vllm", alone on its logger), else None (a user's logging config)."""
    while logger is not None:
        if len(logger.handlers) == 1 and logger.handlers[0].name == "vllm":
            formatter = logger.handlers[0].formatter
            if isinstance(formatter, VllmColoredFormatter):
                return "color"
            if isinstance(formatter, VllmFormatter):
                return "newline"
        logger = logger.parent
    return None


def log_version_and_model(logger: logging.Logger, version: str, model: str) -> None:
    """vLLM's first line: its logo with the version and the model where its own formatter prints it
    (monochrome without colours; VLLM_DISABLE_LOG_LOGO=1: none), else one plain line."""
    kind = formatter_type(logger)
    if os.environ.get("VLLM_DISABLE_LOG_LOGO", "0") not in ("", "0") or kind is None:
        logger.info("vLLM server version %s, serving model %s", version, model)
        return
    colours = _BANNER_COLOURS if kind == "color" else dict.fromkeys(_BANNER_COLOURS, "")
    logger.info(_BANNER.format(**colours), version, model)


def log_access(logger: logging.Logger, request, status: int) -> None:
    """uvicorn's access line of an exchange, logged as its response head goes out (uvicorn's moment: a stream's
    line comes at its start): its arguments as uvicorn gives them (client "host:port", method, path with query,
    HTTP version, status)."""
    if not logger.isEnabledFor(logging.INFO):
        return
    peer = request.transport.get_extra_info("peername") if request.transport is not None else None
    client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else (request.remote or "")
    version = f"{request.version.major}.{request.version.minor}"
    logger.info('%s - "%s %s HTTP/%s" %d', client, request.method, request.raw_path, version, status)


@dataclass
class LoggingConfig:
    """vLLM's LoggingConfig: its fields as the command line and the environment set them."""
    log_level: str
    formatter: str = "text"
    configure_logging: bool = True
    pylogging_config_file: str | None = None


def logging_config(args: argparse.Namespace, logging_json: str | None = None,
                   log_config_file: str | None = None) -> LoggingConfig:
    """The LoggingConfig of a command line: --logging-config's JSON over the environment's defaults, then
    --log-level and --log-config-file (ValueError: a value vLLM would refuse)."""
    try:
        configure = bool(int(os.environ.get("VLLM_CONFIGURE_LOGGING", "1")))
    except ValueError:
        raise ValueError("VLLM_CONFIGURE_LOGGING must be an integer (0: leave logging unconfigured)") from None
    fields: dict = {"log_level": os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper(), "configure_logging": configure,
                    "pylogging_config_file": os.environ.get("VLLM_LOGGING_CONFIG_PATH")}
    if logging_json is not None:
        try:
            given = json.loads(logging_json)
        except ValueError:
            raise ValueError(f"argument --logging-config: invalid loads value: {logging_json!r}") from None
        if not isinstance(given, dict):
            raise ValueError("argument --logging-config: expected a JSON object")
        unknown = set(given) - {"log_level", "formatter", "configure_logging", "pylogging_config_file"}
        if unknown:
            raise ValueError(f"--logging-config: unknown field(s) {', '.join(sorted(unknown))}; LoggingConfig has "
                             "log_level, formatter, configure_logging, pylogging_config_file")
        fields.update(given)
    if args.log_level is not None:
        fields["log_level"] = args.log_level
    if log_config_file is not None:
        fields["pylogging_config_file"] = log_config_file
    config = LoggingConfig(**fields)
    if config.log_level not in LOG_LEVELS:
        where = "--logging-config log_level" if logging_json and "log_level" in json.loads(logging_json) \
            else "VLLM_LOGGING_LEVEL"
        raise ValueError(f"{where}: unknown level {config.log_level!r}; one of {', '.join(LOG_LEVELS)}")
    if config.formatter not in ("text", "json"):
        raise ValueError(f"--logging-config formatter: {config.formatter!r} is not one of text, json")
    if not config.configure_logging and config.pylogging_config_file:
        raise ValueError("Logging configuration is disabled, but a Python logging config file was given. "
                         "pylogging_config_file requires configure_logging to be enabled.")
    return config


def _use_color(stream: str) -> bool:
    """vLLM's _use_color: NO_COLOR or VLLM_LOGGING_COLOR=0 never, VLLM_LOGGING_COLOR=1 or FORCE_COLOR always,
    else when the stream is a terminal."""
    setting = os.environ.get("VLLM_LOGGING_COLOR", "auto")
    if os.environ.get("NO_COLOR") or setting == "0":
        return False
    if setting == "1" or os.environ.get("FORCE_COLOR"):
        return True
    handle = {"ext://sys.stdout": sys.stdout, "ext://sys.stderr": sys.stderr}.get(stream)
    return bool(handle is not None and hasattr(handle, "isatty") and handle.isatty())


def vllm_config(config: LoggingConfig) -> dict:
    """vLLM's DEFAULT_LOGGING_CONFIG at this level and formatter, for its loggers and the emulator's."""
    stream = os.environ.get("VLLM_LOGGING_STREAM", "ext://sys.stdout")
    fmt = (f"{os.environ.get('VLLM_LOGGING_PREFIX', '')}(%(vllm_process_name)s pid=%(process)d) "
           "%(levelname)s %(asctime)s [%(fileinfo)s:%(lineno)d] %(message)s")
    if config.formatter == "json":
        formatter = {"()": JsonFormatter}
    else:
        formatter = {"()": VllmColoredFormatter if _use_color(stream) else VllmFormatter, "datefmt": DATE_FORMAT,
                     "fmt": fmt, "log_level": config.log_level}
    # the stream's name, not "ext://...": dictConfig would hand over the object itself
    if stream in ("ext://sys.stdout", "ext://sys.stderr"):
        handler = {"()": StandardStream, "which": stream.removeprefix("ext://sys.")}
    else:
        handler = {"class": "logging.StreamHandler", "stream": stream}
    # vLLM's "vllm" logger does not propagate; with no handler on the root logger (a command line's case)
    # propagating changes nothing, and it keeps the lines reaching a handler a host process put there
    logger = {"handlers": ["vllm"], "level": config.log_level, "propagate": True}
    return {"version": 1, "disable_existing_loggers": False, "formatters": {"vllm": formatter},
            "handlers": {"vllm": {**handler, "formatter": "vllm", "level": config.log_level}},
            "loggers": {"vllm": logger, "vllm_emulator": dict(logger)}}


def uvicorn_config(config: LoggingConfig, level: str, excluded_paths: list[str]) -> dict:
    """uvicorn's LOGGING_CONFIG as vLLM runs it (with vLLM's access filter and JSON formatter where asked)."""
    if config.formatter == "json":
        formatters = {"default": {"()": JsonFormatter}, "access": {"()": JsonFormatter}}
    else:
        formatters = {"default": {"()": UvicornFormatter, "fmt": "%(levelprefix)s %(message)s", "use_colors": None},
                      "access": {"()": UvicornAccessFormatter,
                                 "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s'}}
    return {"version": 1, "disable_existing_loggers": False,
            "filters": {"access_log_filter": {"()": AccessLogFilter, "excluded_paths": excluded_paths}},
            "formatters": formatters,
            "handlers": {"default": {"()": StandardStream, "which": "stderr", "formatter": "default"},
                         "access": {"()": StandardStream, "which": "stdout", "formatter": "access",
                                    "filters": ["access_log_filter"]}},
            "loggers": {"uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
                        SERVER: {"level": level.upper()},
                        ACCESS: {"handlers": ["access"], "level": level.upper(), "propagate": False}}}


# the formatter classes of vLLM and uvicorn a user's logging config file may name: these stand for them
STAND_INS = {"vllm.logging_utils.NewLineFormatter": VllmFormatter, "vllm.logging.NewLineFormatter": VllmFormatter,
             "vllm.logging_utils.ColoredFormatter": VllmColoredFormatter,
             "vllm.logging_utils.formatter.NewLineFormatter": VllmFormatter,
             "uvicorn.logging.DefaultFormatter": UvicornFormatter,
             "uvicorn.logging.AccessFormatter": UvicornAccessFormatter,
             "vllm.logging_utils.uvicorn_logging.UvicornAccessLogFilter": AccessLogFilter,
             "vllm.logging_utils.UvicornAccessLogFilter": AccessLogFilter,
             "pythonjsonlogger.jsonlogger.JsonFormatter": JsonFormatter}


def read_config_file(path: str) -> dict:
    """A Python logging config file, as vLLM reads one (ValueError: missing, not JSON, not a mapping)."""
    if not os.path.exists(path):
        raise ValueError(f"Could not load logging config. File does not exist: {path}")
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"Could not load logging config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"Invalid logging config. Expected dict, got {type(config).__name__}.")
    for section in ("formatters", "filters", "handlers"):
        for entry in config.get(section, {}).values():
            for key in ("()", "class"):
                name = entry.get(key) if isinstance(entry, dict) else None
                if isinstance(name, str) and name in STAND_INS:  # a factory: its other keys become arguments
                    del entry[key]
                    entry["()"] = STAND_INS[name]
    return config


_TOUCHED = ("vllm", "vllm_emulator", "uvicorn", SERVER, ACCESS)


def configure(config: LoggingConfig, uvicorn_level: str, access_log: bool,
              excluded_paths: list[str]) -> Callable[[], None]:
    """Apply vLLM's and uvicorn's logging set-up; returns what puts the touched loggers back as they were."""
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).level,
                    logging.getLogger(name).propagate, logging.getLogger(name).disabled) for name in _TOUCHED}
    factory = logging.getLogRecordFactory()

    def restore() -> None:
        logging.setLogRecordFactory(factory)
        for name, (handlers, level, propagate, disabled) in saved.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled

    if config.pylogging_config_file:  # authoritative: vLLM's loggers and uvicorn's (it is uvicorn's log_config too)
        _name_processes(factory)
        custom = read_config_file(config.pylogging_config_file)
        logging.config.dictConfig(custom)
        if "vllm_emulator" not in custom.get("loggers", {}):  # the emulator's loggers log as vLLM's
            vllm, emulator = logging.getLogger("vllm"), logging.getLogger("vllm_emulator")
            emulator.handlers[:] = vllm.handlers
            emulator.setLevel(vllm.level)
            emulator.propagate = vllm.propagate
    else:
        if config.configure_logging:  # VLLM_CONFIGURE_LOGGING=0: vLLM's loggers stay as Python has them
            _name_processes(factory)
            logging.config.dictConfig(vllm_config(config))
        # uvicorn sets up its own loggers whatever vLLM does with its
        logging.config.dictConfig(uvicorn_config(config, uvicorn_level, excluded_paths))
    for name in (SERVER, ACCESS, "uvicorn.asgi"):  # uvicorn's Config.configure_logging
        logging.getLogger(name).setLevel(UVICORN_LOG_LEVELS[uvicorn_level])
    if not access_log:
        access = logging.getLogger(ACCESS)
        access.handlers[:] = []
        access.propagate = False
    return restore
