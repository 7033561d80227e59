"""Verifiers with TRL's reward-function signature, and a registry to pick them by name.

``get_reward("countdown")``, ``get_reward("math")``, ``get_reward("passkey")``; add your own with
``@register_reward("name")``. Every reward never executes model text, never raises on garbage
completions, and returns in bounded time.
"""

from rewards.registry import get_reward, list_rewards, register_reward
from rewards.countdown import countdown_reward
from rewards.math import math_reward
from rewards.format import answer_tag_reward
from rewards.passkey import passkey_reward

__all__ = ["countdown_reward", "math_reward", "answer_tag_reward", "passkey_reward", "get_reward", "register_reward", "list_rewards"]
