"""Ahead-of-time compiles for Cloud TPU slices (mim_jax.aot): slice names, the collectives read from
HLO against hand-counted programs, and real compiles for compile-only TPU devices (libtpu, no TPU)."""
import importlib
import os
import subprocess
import sys

import jax
import pytest

from mim_jax.errors import UserFacingError
from mim_jax.methods import resolve_config
from mim_jax.tpu import collectives, topology

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name, grid, chips, hosts", [
    ("v5p-8", (2, 2, 1), 4, 1), ("v5p-16", (2, 2, 2), 8, 2), ("v5p-128", (4, 4, 4), 64, 16),
    ("v5p-1024", (8, 8, 8), 512, 128), ("v4-64", (2, 4, 4), 32, 8), ("v5litepod-4", (2, 2), 4, 1),
    ("v5e-8", (2, 4), 8, 1), ("v5litepod-256", (16, 16), 256, 64), ("v6e-256", (16, 16), 256, 64),
    ("v6e-32", (4, 8), 32, 8), ("v5p:4x4x8", (4, 4, 8), 128, 32),
])
def test_cloud_tpu_names_give_cloud_tpus_chip_grids_and_hosts(name, grid, chips, hosts):
    tpu = topology.parse(name)
    assert (tpu.grid, tpu.chips, tpu.hosts) == (grid, chips, hosts)


@pytest.mark.parametrize("name, message", [
    ("v5x-64", "not a Cloud TPU accelerator type"), ("v5p-96", "power-of-two chip count"),
    ("v6e:4x4x4", "v6e grids have 2 dimensions"),
])
def test_a_wrong_slice_name_says_what_names_exist(name, message):
    with pytest.raises(UserFacingError, match=message):
        topology.parse(name)


HLO = """HloModule hand_counted

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %x = f32[1024]{0} get-tuple-element(%p), index=1
  %gathered = f32[4096]{0:T(1024)} all-gather(%x), channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}
  %ags = (bf16[256,8]{1,0}, bf16[1024,8]{1,0}) all-gather-start(%b.1), channel_id=2, dimensions={0}
  %agd = bf16[1024,8]{1,0} all-gather-done(%ags)
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %x)
}

%fused_gather (param_0: f32[64]) -> f32[256] {
  %param_0 = f32[64]{0} parameter(0)
  ROOT %ag.fused = f32[256]{0} all-gather(%param_0), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
}

%fused_gather.clone (param_0.1: f32[64]) -> f32[256] {
  %param_0.1 = f32[64]{0} parameter(0)
  ROOT %ag.fused.1 = f32[256]{0} all-gather(%param_0.1), channel_id=7, replica_groups={{0,1,2,3}}, dimensions={0}
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p = (s32[], f32[1024]{0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[1024], b: bf16[512,64]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  %b = bf16[512,64]{1,0} parameter(1)
  %b.1 = bf16[256,8]{1,0} parameter(2)
  %scattered = f32[256]{0} reduce-scatter(%a), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}, to_apply=%add
  %ars = bf16[512,64]{1,0} all-reduce-start(%b), channel_id=4, to_apply=%add
  %ard = bf16[512,64]{1,0} all-reduce-done(%ars)
  %f1 = f32[256]{0} fusion(%a), kind=kOutput, calls=%fused_gather
  %f2 = f32[256]{0} fusion(%a), kind=kOutput, calls=%fused_gather.clone
  %w = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"12"}}
  %send = (bf16[128,512]{1,0}, u32[], token[]) send(%b, %tok), channel_id=5, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  %recv = (bf16[128,512]{1,0}, u32[], token[]) recv(%tok), channel_id=6, is_host_transfer=true, frontend_attributes={_xla_megascale_transfer_type="ALL_REDUCE"}
  ROOT %out = f32[1024]{0} get-tuple-element(%w), index=1
}
"""


def test_collectives_are_counted_per_step_with_loop_bodies_once_per_iteration():
    found = collectives.parse(HLO)
    # In the 12-iteration loop: a 4096-float all-gather and an async 1024x8 bf16 one; outside it
    # one 256-float all-gather that the compiler split over two fusions (one channel_id).
    assert found.in_slice["all-gather"] == (25, 12 * (4096 * 4 + 1024 * 8 * 2) + 256 * 4)
    assert found.in_slice["reduce-scatter"] == (1, 1024 * 4)        # its input, the larger side
    assert found.in_slice["all-reduce"] == (1, 512 * 64 * 2)         # start counted, done not
    assert found.across_slices == {"all-reduce": (1, 128 * 512 * 2)}  # the send, not the recv


@pytest.mark.parametrize("attribute, groups", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[2,4]<=[8]", [[0, 1, 2, 3], [4, 5, 6, 7]]),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", [[0, 4], [1, 5], [2, 6], [3, 7]]),
    ("replica_groups={}", [list(range(8))]),
    ("to_apply=%add", [list(range(8))]),
])
def test_replica_groups_are_read_in_both_of_hlos_notations(attribute, groups):
    assert collectives.replica_groups(f"%x), channel_id=1, {attribute}, dimensions={{0}}", 8) == groups


def test_a_collective_whose_groups_mix_two_slices_devices_counts_as_crossing_them():
    program = """HloModule two_slices, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

ENTRY %main (a: f32[256]) -> f32[256] {
  %a = f32[256]{0} parameter(0)
  %inside = f32[256]{0} all-reduce(%a), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add
  ROOT %across = f32[256]{0} all-reduce(%inside), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add
}
"""
    assert collectives.parse(program, devices_per_slice=4) == collectives.Collectives(
        in_slice={"all-reduce": (1, 1024)}, across_slices={"all-reduce": (1, 1024)})
    assert collectives.parse(program).across_slices == {}      # no slices given: none crossed


def _config(name, arg, **overrides):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    with config.unlocked():
        for key, value in overrides.items():
            target = config
            *path, leaf = key.split(".")
            for part in path:
                target = target[part]
            target[leaf] = value
    return resolve_config(config)


@pytest.fixture(scope="module")
def v5e_two_slices():
    pytest.importorskip("libtpu", reason='pip install "jax[tpu]" (requirements-test.txt) compiles for TPUs')
    tpu = topology.parse("v5e-4", num_slices=2)
    return tpu, topology.devices(tpu)


def test_the_local_mae_step_compiles_for_two_tpu_slices_with_fsdp(v5e_two_slices):
    """The devices are compile-only: building the state, the frozen weights and the batch touches
    none of them (an array placed on one would fail), and the step compiles."""
    from mim_jax import aot
    tpu, devices = v5e_two_slices
    assert len(devices) == 8 and topology.hbm_bytes_per_device(tpu, devices) == 16 * 2 ** 30
    config = _config("mae", "local", mesh=(("data", -1), ("fsdp", 2)))
    with jax.transfer_guard("disallow"):
        report = aot.check(config, tpu, devices, eval_batch_size=0)
    assert report["mesh"] == {"data": 4, "fsdp": 2} and report["fits"]
    assert 0 < report["memory"]["total"] < 2 ** 30
    assert report["argument_parts"]["optimizer"] == pytest.approx(2 * report["argument_parts"]["params"], rel=0.01)
    assert 0.9 < report["xla_flops"] / report["analytic_flops"] < 1.2
    found = report["collectives"]
    assert found["in_slice"]["all-gather"][0] > 0          # fsdp gathers the weights inside a slice
    # The gradients are summed over DCN: each device sends its share of them after the sum inside
    # its slice (the float32 gradients over a slice's 4 devices); no collective's groups mix slices.
    assert found["across_slices"].keys() == {"all-reduce"}
    assert 0.9 < found["across_slices"]["all-reduce"][1] / (report["param_bytes"] / 4) < 1.3
    printed = aot.describe(report)
    assert "collectives per step across slices (per device): all-reduce" in printed and printed.endswith(
        aot.verdict(report)) and aot.verdict(report).startswith("fits (")


def test_aot_says_does_not_fit_and_exits_1_for_a_batch_no_chip_holds():
    pytest.importorskip("libtpu")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "mim_jax.aot", "--config=configs/mae.py:variant=B/16", "--topology=v5e-4",
         "--eval_batch_size=0", "--config.model.depth=2", "--config.decoder.depth=1",
         "--config.input.batch_size=16384"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "does not fit by" in out.stdout and "Traceback" not in out.stderr, out.stdout + out.stderr[-2000:]
    assert "batch 16384 (4096 per device)" in out.stdout


def test_without_libtpu_the_command_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)    # import libtpu raises ImportError
    with pytest.raises(UserFacingError, match=r'pip install "jax\[tpu\]=='):
        topology.devices(topology.parse("v5e-4"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cae_v2", "capi", "beyond_masking", "cmae"])
def test_every_methods_local_preset_compiles_for_two_v5e_slices(method, v5e_two_slices):
    """Two v5e 2x2 slices over DCN (MAE's preset: the default tier's two-slice test). The feature
    step is compiled once, for CAPI (the evaluators' program is the same for every method: its
    encoder, on the train state's shardings), to keep this tier's compiles few."""
    from mim_jax import aot
    tpu, devices = v5e_two_slices
    # CAE v2's local teacher is a MAE run on disk; the recipe CLIP's shapes are known without one.
    overrides = {"teacher.source": "openai/clip-vit-base-patch16"} if method == "cae_v2" else {}
    report = aot.check(_config(method, "local", **overrides), tpu, devices,
                       eval_batch_size=64 if method == "capi" else 0)
    assert report["fits"] and (method != "capi" or report["features"]["fits"])
    assert 0.8 < report["xla_flops"] / report["analytic_flops"] < 1.3, report
    assert "all-reduce" in report["collectives"]["across_slices"]


@pytest.mark.slow
def test_a_real_width_vit_b_step_fits_a_v5e_chip_at_256_images_and_gathers_its_weights_once_a_pass():
    pytest.importorskip("libtpu")
    from mim_jax import aot
    tpu = topology.parse("v5e-4")
    devices = topology.devices(tpu)
    config = _config("mae", "variant=B/16", **{"model.depth": 2, "decoder.depth": 1, "input.batch_size": 256 * 4,
                                              "mesh": (("data", 1), ("fsdp", 4))})
    report = aot.check(config, tpu, devices, eval_batch_size=0)
    assert report["fits"] and report["batch_per_device"] == 256
    assert 0.95 < report["xla_flops"] / report["analytic_flops"] < 1.1
    # FSDP gathers the weights in bf16 for the forward pass and again for the backward one:
    # together about the parameters' float32 size; more would be a sharding bug.
    gathered = report["collectives"]["in_slice"]["all-gather"][1]
    assert 0.5 * report["param_bytes"] < gathered <= 1.05 * report["param_bytes"], gathered / report["param_bytes"]


def test_find_batch_doubles_then_bisects_to_the_largest_batch_that_fits(monkeypatch):
    from mim_jax import aot
    tried = []

    def check(config, tpu, devices, eval_batch_size=None):
        per_device = config.input.batch_size // len(devices)
        tried.append(per_device)
        return {"fits": per_device <= 37, "per_device": per_device}

    monkeypatch.setattr(aot, "check", check)
    config = _config("mae", "local")
    best, report = aot.find_batch(config, topology.parse("v5e-4"), devices=[None] * 4)
    assert best == 37 and report["per_device"] == 37
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    monkeypatch.setattr(aot, "check", lambda *a, **k: {"fits": False})
    assert aot.find_batch(config, topology.parse("v5e-4"), devices=[None] * 4) == (0, None)


def test_the_compiled_batch_has_the_dtypes_the_input_pipeline_delivers():
    """Pre-training pipelines hand the step uint8 images (normalised on the device), fine-tuning
    normalised float32 ones: the step is compiled for those, as the trainer's first call traces it."""
    from mim_jax.methods import get_method
    from mim_jax.tpu import steps
    pretraining = steps.delivered_dtypes(get_method(_config("cmae", "local"), num_examples=8))
    assert pretraining["image"] == pretraining["image2"] == "uint8"
    finetuning = steps.delivered_dtypes(get_method(_config("finetune", "init=random,pretrain=mae:local"), num_examples=8))
    assert finetuning["image"] == "float32"
