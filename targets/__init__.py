"""Target parsing and what differs per target."""
from .parse import (TargetError, host_target_string, parse_target, requirements, resolved,
                    target_text)

__all__ = ["TargetError", "host_target_string", "parse_target", "requirements", "resolved",
           "target_text"]
