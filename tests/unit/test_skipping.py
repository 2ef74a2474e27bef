"""Real compute skipping (`generate(skip="compute")`) against the masked reference, on tiny
random bridges of two architectures (the shipped model is covered in tests/integration).

Tolerance: log-probs within SKIP_TOL = 1e-4 of the masked path (the same computation on
fewer rows, so only float rounding of the batched matmuls differs); tokens and exit
layers identical.
"""

import pytest
import torch

from eetools.core.fast.skipping import SKIPPABLE, compute_skipping, skip_support
from eetools.core.hooks import count_hooks

SKIP_TOL = 1e-4


def _eager_heads(ee, biases):
    with torch.no_grad():
        for h, b in zip(ee.heads, biases):
            h.net[-1].bias.fill_(b)


def _assert_same(a, b):
    assert torch.equal(a.tokens, b.tokens), "skipping changed the generated tokens"
    assert torch.equal(a.exit_layers, b.exit_layers), "skipping changed the exits"
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, atol=SKIP_TOL, rtol=0)
    torch.testing.assert_close(a.exit_logprobs, b.exit_logprobs, atol=SKIP_TOL, rtol=0)


@pytest.mark.parametrize("gather", [True, False], ids=["gather-rows", "cost-rule"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_compute_skipping_matches_masking(tiny_ee, temperature, gather, monkeypatch):
    if gather:  # every component gathers its running rows, however small (the tiny bridge's are)
        monkeypatch.setattr("eetools.core.fast.skipping.MIN_SAVED_MACS", 0)
    _eager_heads(tiny_ee, [-1.0, -0.5, 0.0])  # many exits, at every layer
    prompts = ["Q: 12+34\n", "Q: 1+2\nab c", "hello"]  # left padding, rows exit at different layers
    masked = tiny_ee.generate(prompts, 24, seed=1, temperature=temperature)
    skipped = tiny_ee.generate(prompts, 24, seed=1, temperature=temperature, skip="compute")
    _assert_same(masked, skipped)
    ex = masked.exit_layers[masked.mask]
    assert len(set(ex.tolist())) >= 3, "the test needs exits at several layers"
    # a batch where in some steps every row exits and in others none does
    one = tiny_ee.generate(["Q: 5+6\n"], 24, seed=2, skip="compute")
    _assert_same(tiny_ee.generate(["Q: 5+6\n"], 24, seed=2), one)


def test_compute_skipping_actually_skips(tiny_ee):
    """Exited rows never reach the MLP of later blocks: count the rows each MLP sees."""
    _eager_heads(tiny_ee, [30.0, 30.0, 30.0])  # every generated token exits at layer 1
    seen = []
    # the weight-holding leaves inside the MLP run only when its real forward runs
    leaves = [
        m
        for m in tiny_ee.model.blocks[2].mlp.modules()
        if getattr(m, "weight", None) is not None and not list(m.children())
    ]
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[:2]))) for m in leaves]
    try:
        r = tiny_ee.generate(["Q: 1+2\n", "Q: 3+4\n"], 6, seed=0, temperature=0, skip="compute")
    finally:
        for h in handles:
            h.remove()
    assert leaves and (r.exit_layers[:, 1:] == 1).all()
    # the prompt step runs the MLP on every row and position; later steps skip it (all rows exited)
    assert set(seen) == {(2, r.prompt_tokens.shape[1])}


def test_a_component_gathers_rows_only_when_skipping_saves_more_than_the_gather(monkeypatch):
    """Rows are gathered when the work skipped (rows x weights) reaches MIN_SAVED_MACS; otherwise the
    component runs on every row, as the masked path does, and every row exited means no run at all."""
    from eetools.core.fast import skipping

    seen = []
    lin = torch.nn.Linear(64, 64)  # 4,160 weights, inside the component whose forward is wrapped
    lin.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    x = torch.randn(8, 1, 64)
    state = {}
    wrapped = skipping._RowSkip(torch.nn.Sequential(lin), lambda: state.get("running"))
    full = wrapped(x)  # no step info: runs as is
    assert seen == [8]

    def call(running_rows, min_macs):
        monkeypatch.setattr(skipping, "MIN_SAVED_MACS", min_macs)
        rows = torch.tensor(running_rows, dtype=torch.long)
        state["running"] = (rows, len(rows), 8)
        seen.clear()
        out = wrapped(x)
        torch.testing.assert_close(out[rows], full[rows])
        return seen[:]

    assert call([0, 2, 5], 5 * 4160) == [3]  # 5 rows x 4,160 weights skipped: worth gathering
    assert call([0, 2, 5], 5 * 4160 + 1) == [8]  # just short of the limit: all rows, no gather
    assert call(list(range(7)), 4160 + 1) == [8]
    assert call([], 10**12) == [], "every row exited: nothing to run, whatever the limit"
    monkeypatch.setattr(skipping, "MIN_SAVED_MACS", 0)
    assert (wrapped(x) == 0).all()


@pytest.mark.parametrize("path", ["bypass", "bridge"])
def test_query_norm_runs_only_on_running_rows(tiny_ee, arch, path, monkeypatch):
    """Qwen3's query norm (``[batch, heads, 1, d_head]`` at a decode step) is skipped with the query,
    whether the decode runs the HF modules directly or, with a hook attached, the bridge's components."""
    if arch != "qwen3":
        pytest.skip("GPT-2 blocks have no query norm")
    _eager_heads(tiny_ee, [-30.0, 30.0, -30.0])  # every generated token exits at layer 2
    seen = []
    norm = tiny_ee.model.blocks[2].attn.q_norm
    leaf = norm.original_component
    plain = type(leaf).forward

    def counted(self, x, *a, **k):  # the norm's computation, wherever it is called from
        if self is leaf:
            seen.append(x.shape[0])
        return plain(self, x, *a, **k)

    monkeypatch.setattr(type(leaf), "forward", counted)
    prompts = ["Q: 1+2\n", "Q: 3+4\n", "Q: 5+6\n"]
    masked = tiny_ee.generate(prompts, 6, seed=0, temperature=0)
    noop = [("blocks.0.hook_resid_pre", lambda resid, hook: None)] if path == "bridge" else []
    with tiny_ee.model.hooks(fwd_hooks=noop):  # a hook on the bridge keeps the decode on its components
        seen.clear()
        skipped = tiny_ee.generate(prompts, 6, seed=0, temperature=0, skip="compute")
    _assert_same(masked, skipped)
    assert (skipped.exit_layers[:, 1:] == 2).all()
    assert seen == [3], "the query norm of block 2 ran on exited rows after the prompt step"
    assert "forward" not in norm.__dict__ and "forward" not in leaf.__dict__


def test_wrappers_are_removed_even_on_errors(tiny_ee):
    bridge = tiny_ee.model
    modules = [m for b in bridge.blocks for m in (b.attn.q, b.attn.o, b.mlp, b.ln2, getattr(b.attn, "q_norm", b.ln2))]
    assert not any("forward" in m.__dict__ for m in modules)
    orig = tiny_ee.heads[0].forward

    def boom(*a, **k):
        raise RuntimeError("injected")

    tiny_ee.heads[0].forward = boom
    with pytest.raises(RuntimeError, match="injected"):
        tiny_ee.generate("Q: 1+2\n", 4, seed=0, skip="compute")
    tiny_ee.heads[0].forward = orig
    assert not any("forward" in m.__dict__ for m in modules), "a skipping wrapper stayed on a component"
    assert count_hooks(bridge) == 0


def test_bad_skip_options_are_clear(tiny_ee):
    with pytest.raises(ValueError, match="skip must be one of"):
        tiny_ee.generate("Q: 1+2\n", 4, skip="fast")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        tiny_ee.generate("Q: 1+2\n", 4, skip="compute", use_cache=False)


def test_unsupported_architecture_falls_back_to_masking_with_a_warning(tiny_ee, monkeypatch):
    assert skip_support(tiny_ee.model) is None
    _eager_heads(tiny_ee, [-1.0, -0.5, 0.0])
    masked = tiny_ee.generate(["Q: 12+34\n"], 12, seed=0)
    monkeypatch.setattr("eetools.core.fast.skipping.SKIPPABLE", (*SKIPPABLE, "attn.no_such_projection"))
    with pytest.warns(UserWarning, match="falling back to masking"):
        fallback = tiny_ee.generate(["Q: 12+34\n"], 12, seed=0, skip="compute")
    _assert_same(masked, fallback)


def test_context_manager_reports_support(tiny_ee):
    from eetools.core.state import ExitState

    with compute_skipping(tiny_ee, ExitState(tiny_ee)) as active:
        assert active is True


def test_lora_adapters_are_merged_for_the_call_and_restored_exactly(tiny_ee):
    from eetools.core.adapters import add_lora, lora_layers

    add_lora(tiny_ee, r=4)
    with torch.no_grad():  # non-zero adapters, so merging changes the weights
        for n, p in tiny_ee.model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    _eager_heads(tiny_ee, [-1.0, -0.5, 0.0])
    before = {n: p.detach().clone() for n, p in tiny_ee.model.named_parameters()}
    prompts = ["Q: 12+34\n", "Q: 1+2\nab c"]
    _assert_same(tiny_ee.generate(prompts, 16, seed=0), tiny_ee.generate(prompts, 16, seed=0, skip="compute"))
    assert not any(m.merged for m in lora_layers(tiny_ee))
    for n, p in tiny_ee.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed after generate(skip='compute')"


def test_merged_adapters_bypass_the_peft_wrappers_inside_the_block_only(tiny_ee):
    from peft.tuners.lora import LoraLayer

    from eetools.core.adapters import adapters_merged, add_lora, lora_layers

    add_lora(tiny_ee, r=4)
    n_lora = len(lora_layers(tiny_ee))
    modules_before = dict(tiny_ee.model.named_modules())
    with adapters_merged(tiny_ee):
        # a merged peft layer only forwards to its base layer, so the base layer is called directly
        assert not any(isinstance(m, LoraLayer) for m in tiny_ee.model.modules())
        assert len(lora_layers(tiny_ee)) == n_lora  # still known, as the layers to restore
    assert len(lora_layers(tiny_ee)) == n_lora
    assert all(modules_before[n] is m for n, m in tiny_ee.model.named_modules())


def test_adapters_are_found_again_once_added_to_a_bridge_already_searched(tiny_ee):
    """The LoRA layers are looked up once per bridge (a walk of its module tree); adding adapters
    starts a new walk, seen by every exit model on that bridge."""
    from eetools.core.adapters import add_lora, lora_layers
    from eetools.core.model import attach_exit_heads

    other = attach_exit_heads(tiny_ee.model, tiny_ee.exit_layers)  # a second exit model, same bridge
    assert lora_layers(tiny_ee) == [] and lora_layers(other) == []
    add_lora(tiny_ee, r=2)
    assert len(lora_layers(other)) == len(lora_layers(tiny_ee)) > 0
    with other.adapters_disabled():
        assert all(m.disable_adapters for m in lora_layers(tiny_ee))
    assert not any(m.disable_adapters for m in lora_layers(tiny_ee))


def test_a_block_every_row_has_exited_computes_only_keys_and_values(tiny_ee, arch, monkeypatch):
    """At batch 1, once the token exited, a later block runs only its key and value projections
    (`_KVOnly`), and the keys it caches are the ones later tokens that run deeper read: the rollout
    equals the masked reference's while exits land at every layer."""
    from eetools.core.fast import skipping

    bridge_block = tiny_ee.model.blocks[3]
    if type(bridge_block.attn.original_component).__name__ not in skipping.KV_ONLY:
        assert arch == "gpt2", f"{arch}'s decoder layers should compute keys and values alone"
        pytest.skip("GPT-2 blocks keep the per-component skipping")
    calls = {"q": 0, "k": 0, "mlp": 0}
    block = bridge_block.original_component
    hf = {"q": bridge_block.attn.q.original_component, "k": bridge_block.attn.k.original_component}
    for name, module in (("q", hf["q"]), ("k", hf["k"]), ("mlp", bridge_block.mlp.original_component)):
        module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    _eager_heads(tiny_ee, [-1.0, -0.5, 0.0])  # exits at layers 1, 2, 3 and none, token by token
    masked = tiny_ee.generate(["Q: 5+6\n"], 40, seed=2)
    for k in calls:
        calls[k] = 0
    skipped = tiny_ee.generate(["Q: 5+6\n"], 40, seed=2, skip="compute")
    _assert_same(masked, skipped)
    ex = skipped.exit_layers[0, skipped.mask[0]].tolist()
    exited = sum(e <= 3 for e in ex[1:])  # tokens that exited before block 3 (the first token never exits)
    # the keys block 3 cached for an exited token were read by a later token that ran through block 3
    assert any(a <= 3 < b for a, b in zip(ex[1:], ex[2:])), ex
    assert exited >= 5 and calls["k"] == len(ex)  # every step caches block 3's keys
    assert calls["q"] == calls["mlp"] == len(ex) - exited, "an exited token ran block 3's query or MLP"
    assert "forward" not in block.__dict__, "the decoder layer's forward was not restored"


class _OurSyncs:
    """Counts the ops that copy a device value to the host (``item()``, ``int(t)``, ``nonzero``) that our code
    makes: a sync is the model code's when the innermost Python frame outside torch is in transformers' or
    TransformerLens' package (GPT-2's forward checks its input for padding once per call:
    `warn_if_padding_and_no_attention_mask`); every other sync is ours.

    Packages are told apart by their folders, not by a word in the path: a virtual environment inside a
    clone named ``eetools/`` puts "eetools" in transformers' path too (that made the GPT-2 case count HF's
    30 padding checks as ours on a fresh clone: 129 > 99).
    """

    def __init__(self):
        import os
        from pathlib import Path

        import transformer_lens
        import transformers

        self.torch_dir = str(Path(torch.__file__).parent) + os.sep
        self.model_code = tuple(str(Path(m.__file__).parent) + os.sep for m in (transformers, transformer_lens))
        self.n = {"_local_scalar_dense": 0, "nonzero": 0}

    def __enter__(self):
        import traceback

        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in counter.n:
                    stack = traceback.extract_stack()[:-1]  # less this frame
                    outside = [f.filename for f in stack if not f.filename.startswith(counter.torch_dir)]
                    counter.n[name] += not outside[-1].startswith(counter.model_code)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _decode_syncs(ee, skip):
    """(our syncs, the bound: one per exitable layer a decode token reaches undecided, one per token, one per
    call) for a 30-token batch-1 rollout."""
    with _OurSyncs() as syncs:
        r = ee.generate(["Q: 5+6\n"], 30, seed=2, skip=skip)
    layers = ee.exit_layers
    ex = r.exit_layers[0, r.mask[0]].tolist()
    reached = sum(layers.index(e) + 1 if e in layers else len(layers) for e in ex[1:])  # decisions made
    assert any(e in layers for e in ex), ex
    # + 1: whether the prompt is padded, once per call
    return syncs.n, reached + len(ex) + 1


def test_batch_one_decode_syncs_only_for_exit_decisions_and_once_per_token(tiny_ee):
    """At batch 1 the host asks the device once per exitable layer the token reaches undecided (it must
    know whether to run the next block) and once per token (has it ended?): never per block. Only our
    syncs are counted (`_OurSyncs`: the HF forward's own checks are not ours, and are told apart by package
    folder, so the count holds wherever the virtual environment lives)."""
    _eager_heads(tiny_ee, [-1.0, -0.5, 0.0])
    for skip in ("compute", "mask"):
        n, bound = _decode_syncs(tiny_ee, skip)
        assert n["nonzero"] == 0 and n["_local_scalar_dense"] <= bound, (skip, n, bound)


def test_the_decode_sync_count_catches_a_sync_per_block(tiny_ee, monkeypatch):
    """The bug the count is for: one host sync in each skipped component's forward (per block, per token)
    makes it exceed the bound, and a sync from HF's model code does not count as ours."""
    from eetools.core.fast import skipping

    _eager_heads(tiny_ee, [-1.0, -0.5, 0.0])
    inner = skipping._RowSkip.__call__

    def syncing(self, x, *a, **k):
        bool(x.abs().sum() > 0)  # a per-block host sync, as a data-dependent branch would make
        return inner(self, x, *a, **k)

    monkeypatch.setattr(skipping._RowSkip, "__call__", syncing)
    n, bound = _decode_syncs(tiny_ee, "compute")
    assert n["_local_scalar_dense"] > bound + 30, (n, bound)
    monkeypatch.undo()
    from types import SimpleNamespace

    import transformers.modeling_utils as mu

    hf_model = SimpleNamespace(config=SimpleNamespace(pad_token_id=0))
    with _OurSyncs() as syncs:
        mu.PreTrainedModel.warn_if_padding_and_no_attention_mask(hf_model, torch.tensor([[1, 2]]), None)
        torch.tensor([1]).item()  # ours
    assert syncs.n["_local_scalar_dense"] == 1, syncs.n


@pytest.mark.parametrize("arch_name", ["llama", "qwen2", "mistral"])
def test_keys_and_values_only_blocks_match_masking_on_the_other_listed_architectures(
    tmp_path, build_tiny, arch_name, monkeypatch
):
    """`KV_ONLY` names Llama, Qwen2 and Mistral layers too: on a tiny random model of each, the short path
    is taken and the rollout equals the masked reference while exits land at every layer."""
    import eetools
    from eetools.core.fast import skipping

    bridge = eetools.load_model(str(build_tiny(tmp_path, arch_name)))
    bridge.cfg.default_prepend_bos = True
    torch.manual_seed(0)
    ee = eetools.attach_exit_heads(bridge, layers=[1, 2, 3])
    _eager_heads(ee, [-1.0, -0.5, 0.0])
    short = []
    inner = skipping._KVOnly.__call__

    def counted(self, h, *a, **k):
        short.append(not a and k.get("past_key_values") is not None and h.shape[1] == 1 and self.exited())
        return inner(self, h, *a, **k)

    monkeypatch.setattr(skipping._KVOnly, "__call__", counted)
    masked = ee.generate(["Q: 5+6\n"], 30, seed=2)
    skipped = ee.generate(["Q: 5+6\n"], 30, seed=2, skip="compute")
    _assert_same(masked, skipped)
    ex = masked.exit_layers[0, masked.mask[0]].tolist()
    assert len(set(ex)) >= 3 and sum(short) > 5, (ex, sum(short))
