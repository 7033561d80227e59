"""The learner: replay of rollout records under per-layer masks (:mod:`.replay`), the Dr. GRPO
token and eviction losses (:mod:`.loss`), and the DeepSpeed learner that applies them
(:mod:`.learner`, configured by :mod:`.config`)."""
