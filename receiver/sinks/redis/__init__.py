"""The ``redis`` sink (``sink``) and its wire format (``wire``), which ``receiver consume``
imports too."""

from receiver.sinks.redis.sink import RedisSink, RedisSinkError, RedisSinks
from receiver.sinks.redis.wire import FORMAT_VERSION

__all__ = ["FORMAT_VERSION", "RedisSink", "RedisSinkError", "RedisSinks"]
