"""Schema and loading of ``relay.toml``; imports nothing else of the relay."""

from config.loader import ConfigError, Problem, load_config, parse_config
from config.models import (
    AccountConfig,
    HttpConfig,
    LogConfig,
    QueueConfig,
    RelayConfig,
    ServerConfig,
    StorageConfig,
    UpstreamConfig,
    UpstreamScheme,
    split_listen,
)
from config.units import parse_duration, parse_size

__all__ = [
    "AccountConfig",
    "ConfigError",
    "HttpConfig",
    "LogConfig",
    "Problem",
    "QueueConfig",
    "RelayConfig",
    "ServerConfig",
    "StorageConfig",
    "UpstreamConfig",
    "UpstreamScheme",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_size",
    "split_listen",
]
