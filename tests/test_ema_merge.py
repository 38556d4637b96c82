"""Post-hoc EMA merge of LoRA checkpoints (spec section 7)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file, save_file

from musubi import cli, files as safetensors_io
from musubi.lora.ema import (SIGMA_REL_MAX, CheckpointChoice, effective_weights, merge_decays, post_hoc_ema_merge,
                              select_run_checkpoints, sigma_rel_of_gamma, solve_gamma)
from musubi.errors import MusubiError

torch.set_num_threads(1)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_TIME = 1_700_000_000


def lora_tensors(seed: int, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """A small LoRA with every dtype a trainer may save, an int tensor and alphas."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    return {
        "blocks.0.attn.lora_down.weight": randn(4, 16).to(torch.bfloat16),
        "blocks.0.attn.lora_up.weight": randn(16, 4).to(torch.bfloat16),
        "blocks.0.attn.alpha": torch.tensor(alpha, dtype=torch.bfloat16),
        "blocks.1.ffn.lora_down.weight": randn(4, 24).to(torch.float16),
        "blocks.1.ffn.lora_up.weight": randn(24, 4).to(torch.float16),
        "blocks.1.ffn.alpha": torch.tensor(alpha),
        "blocks.2.proj.lora_down.weight": randn(4, 8),
        "blocks.2.proj.lora_up.weight": randn(8, 4),
        "blocks.2.proj.alpha": torch.tensor(alpha),
        "step_counter": torch.tensor([seed, 2 * seed], dtype=torch.int64),
    }


def write_lora(folder, name: str, seed: int, mtime_offset: int, tensors=None, metadata=None) -> str:
    path = str(folder / name)
    tensors = lora_tensors(seed) if tensors is None else tensors
    if metadata is None:
        metadata = {"ss_output_name": name, "ss_steps": str(seed * 100), "sshs_model_hash": "stale", "modelspec.title": name}
    save_file(tensors, path, metadata=metadata)
    os.utime(path, (BASE_TIME + mtime_offset, BASE_TIME + mtime_offset))
    return path


@pytest.fixture
def run_files(tmp_path):
    """Five checkpoints whose names do not follow their modification times."""
    mtime_offsets = {"e.safetensors": 0, "c.safetensors": 10, "a.safetensors": 20, "d.safetensors": 30, "b.safetensors": 40}
    paths = {name: write_lora(tmp_path, name, seed, offset)
             for seed, (name, offset) in enumerate(mtime_offsets.items(), start=1)}
    by_mtime = [paths[name] for name in ["e.safetensors", "c.safetensors", "a.safetensors", "d.safetensors", "b.safetensors"]]
    return sorted(paths.values()), by_mtime


def musubi_linear_betas(n_files, beta1, beta2):
    count = n_files - 1
    return [beta1 + (beta2 - beta1) * (i / (count - 1)) if count > 1 else beta1 for i in range(count)]


def reference_merge(ordered_paths, betas):
    """The update of spec 7.2/7.3 written out plainly, whole files at a time."""
    first = load_file(ordered_paths[0])
    average = {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in first.items()}
    for path, beta in zip(ordered_paths[1:], betas):
        for name, tensor in load_file(path).items():
            if name.endswith(".alpha") or not tensor.is_floating_point():
                continue
            average[name] = average[name] * beta + tensor.float() * (1 - beta)
    return {name: average[name].to(first[name].dtype) for name in first}


def assert_bitwise_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for name in expected:
        assert actual[name].dtype == expected[name].dtype, name
        assert torch.equal(actual[name], expected[name]), name


def independent_hashes(tensors, metadata):
    training = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    buffer = safetensors.torch.save(tensors, training)
    header_length = int.from_bytes(buffer[:8], "little")
    json.loads(buffer[8:8 + header_length])  # the split point really is the end of the header
    return hashlib.sha256(buffer[8 + header_length:]).hexdigest(), hashlib.sha256(buffer[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("beta, beta2", [(0.95, None), (0.9, 0.99), (0.5, 0.1), (0.0, 1.0)])
def test_linear_merge_is_bit_identical_to_the_reference_loop(tmp_path, run_files, beta, beta2):
    paths, by_mtime = run_files
    output = str(tmp_path / "out" / "merged.safetensors")
    os.mkdir(tmp_path / "out")
    result = post_hoc_ema_merge(paths, output, beta=beta, beta2=beta2)
    assert result.files == by_mtime
    betas = musubi_linear_betas(len(paths), beta, beta if beta2 is None else beta2)
    assert result.decays == betas
    assert_bitwise_equal(load_file(output), reference_merge(by_mtime, betas))


def test_no_sort_merges_in_the_given_order(tmp_path, run_files):
    paths, by_mtime = run_files
    given = paths[::-1]
    output = str(tmp_path / "merged.safetensors")
    result = post_hoc_ema_merge(given, output, beta=0.8, beta2=0.9, no_sort=True)
    assert result.files == given != by_mtime
    assert_bitwise_equal(load_file(output), reference_merge(given, musubi_linear_betas(5, 0.8, 0.9)))
    # the metadata comes from the last file of the merge order, here the first by mtime
    assert result.metadata["ss_output_name"] == os.path.basename(given[-1])


def test_mtime_ties_keep_the_given_order(tmp_path):
    paths = [write_lora(tmp_path, f"{name}.safetensors", seed, 5) for seed, name in enumerate("zyx", start=1)]
    result = post_hoc_ema_merge(paths, str(tmp_path / "out.safetensors"))
    assert result.files == paths


def test_linear_effective_weights_match_the_closed_form():
    decays = merge_decays(6, 0.9, 0.6)
    weights = effective_weights(decays)
    assert weights[0] == pytest.approx(math.prod(decays), abs=1e-15)
    for tau in range(1, 6):
        assert weights[tau] == pytest.approx((1 - decays[tau - 1]) * math.prod(decays[tau:]), abs=1e-15)
    assert sum(weights) == pytest.approx(1, abs=1e-15)
    # constant beta: w_0 = beta^c, w_tau = (1 - beta) beta^(c - tau)
    constant = effective_weights(merge_decays(4, 0.7))
    assert constant == pytest.approx([0.7**3, 0.3 * 0.7**2, 0.3 * 0.7, 0.3], abs=1e-15)
    assert merge_decays(2, 0.9, 0.1) == [0.9]
    assert merge_decays(1) == [] and effective_weights([]) == [1.0]


def test_merged_tensors_are_the_weighted_sum_of_the_files(tmp_path, run_files):
    paths, by_mtime = run_files
    result = post_hoc_ema_merge(paths, str(tmp_path / "m.safetensors"), beta=0.7, beta2=0.9)
    check_weighted_sum(load_file(result.output_file), by_mtime, result.weights)


def check_weighted_sum(merged, ordered_paths, weights):
    files = [load_file(path) for path in ordered_paths]
    for name, tensor in merged.items():
        if name.endswith(".alpha") or not tensor.is_floating_point():
            assert torch.equal(tensor, files[0][name]), name  # kept from the oldest file
            continue
        expected = sum(weight * file[name].double() for weight, file in zip(weights, files))
        tolerance = {torch.bfloat16: 2**-7, torch.float16: 2**-10, torch.float32: 1e-6}[tensor.dtype]
        torch.testing.assert_close(tensor.double(), expected.to(tensor.dtype).double(), rtol=tolerance, atol=1e-5)


SIGMA_REL_TABLE = [(0.05, 16.972), (0.1, 6.9372), (0.15, 3.5579), (0.2, 1.8262), (0.25, 0.71982)]


@pytest.mark.parametrize("sigma_rel, gamma", SIGMA_REL_TABLE)
def test_solve_gamma_matches_the_spec_table_and_the_cubic(sigma_rel, gamma):
    solved = solve_gamma(sigma_rel)
    assert solved == pytest.approx(gamma, rel=1e-4)
    cubic_roots = np.roots([1, 7, 16 - sigma_rel**-2, 12 - sigma_rel**-2])
    assert solved == pytest.approx(cubic_roots.real.max(), rel=1e-10)
    assert math.sqrt((solved + 1) / ((solved + 2) ** 2 * (solved + 3))) == pytest.approx(sigma_rel, rel=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.2887, 0.29, 0.295, 0.3, 0.3002])
def test_solve_gamma_beyond_one_over_sqrt12_takes_the_upper_branch(sigma_rel):
    assert sigma_rel > 1 / math.sqrt(12)
    gamma = solve_gamma(sigma_rel)
    assert -1 < gamma < 0
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-12)
    # the largest real root of the EDM2 cubic, i.e. the branch that continues gamma >= 0
    cubic_roots = np.roots([1, 7, 16 - sigma_rel**-2, 12 - sigma_rel**-2])
    assert gamma == pytest.approx(max(r.real for r in cubic_roots if abs(r.imag) < 1e-9), abs=1e-6)
    assert gamma >= (math.sqrt(5) - 3) / 2 - 1e-9


def test_solve_gamma_at_known_points():
    assert solve_gamma(0.3) == pytest.approx(-1 / 3, abs=1e-9)  # (2/3) / ((5/3)^2 (8/3)) = 0.09
    assert solve_gamma(1 / math.sqrt(12)) == pytest.approx(0, abs=1e-9)
    # the widest profile: phi^(-5/2) at gamma = -1/phi^2
    phi = (1 + math.sqrt(5)) / 2
    assert SIGMA_REL_MAX == pytest.approx(phi**-2.5, rel=1e-15)
    assert max(sigma_rel_of_gamma(g) for g in np.linspace(-0.99, 5, 20001)) <= SIGMA_REL_MAX
    assert solve_gamma(SIGMA_REL_MAX) == pytest.approx(-1 / phi**2, abs=1e-6)


@pytest.mark.parametrize("sigma_rel", [0.0, -0.1, 0.31, 0.5, float("nan")])
def test_solve_gamma_rejects_out_of_range_values(sigma_rel):
    with pytest.raises(MusubiError, match=r"sigma_rel.*\(0, 0\.30028\]"):
        solve_gamma(sigma_rel)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.2, 0.295])
def test_sigma_rel_weights_follow_the_power_profile(sigma_rel):
    n = 7
    p = solve_gamma(sigma_rel) + 1
    decays = merge_decays(n, beta=0.3, sigma_rel=sigma_rel)
    assert decays == pytest.approx([(k / (k + 1)) ** p for k in range(1, n)], rel=1e-14)
    expected = [((tau + 1) ** p - tau**p) / n**p for tau in range(n)]
    assert effective_weights(decays) == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(1 / n**p) and expected[0] > 0


def test_sigma_rel_merge_includes_the_oldest_file(tmp_path, run_files):
    paths, by_mtime = run_files
    result = post_hoc_ema_merge(paths, str(tmp_path / "s.safetensors"), sigma_rel=0.25)
    p = solve_gamma(0.25) + 1
    n = len(paths)
    assert result.weights == pytest.approx([((tau + 1) ** p - tau**p) / n**p for tau in range(n)], rel=1e-12)
    assert result.weights[0] > 0.05
    check_weighted_sum(load_file(result.output_file), by_mtime, result.weights)


def test_wide_sigma_rel_merges_with_more_weight_on_older_files(tmp_path, run_files):
    paths, by_mtime = run_files
    result = post_hoc_ema_merge(paths, str(tmp_path / "w.safetensors"), sigma_rel=0.295)
    assert all(older > newer for older, newer in zip(result.weights, result.weights[1:]))
    check_weighted_sum(load_file(result.output_file), by_mtime, result.weights)


def test_output_keeps_dtypes_and_takes_metadata_from_the_newest_file(tmp_path, run_files):
    paths, by_mtime = run_files
    output = str(tmp_path / "merged.safetensors")
    result = post_hoc_ema_merge(paths, output, beta=0.9, extra_metadata={"modelspec.title": "merged"})
    merged = load_file(output)
    first = load_file(by_mtime[0])
    assert {name: t.dtype for name, t in merged.items()} == {name: t.dtype for name, t in first.items()}

    _, written = safetensors_io.read_header(output)
    assert written == result.metadata
    newest_metadata = safetensors_io.read_header(by_mtime[-1])[1]
    assert written["ss_output_name"] == "b.safetensors" == newest_metadata["ss_output_name"]
    assert written["ss_steps"] == newest_metadata["ss_steps"]
    assert written["modelspec.title"] == "merged"
    assert (written["sshs_model_hash"], written["sshs_legacy_hash"]) == independent_hashes(merged, written)
    assert written["sshs_model_hash"] != "stale"

    provenance = json.loads(written["ss_post_hoc_ema"])
    assert provenance["mode"] == "linear" and provenance["beta"] == 0.9 and provenance["beta2"] == 0.9
    assert [name for name, _ in provenance["files"]] == [os.path.basename(path) for path in by_mtime]
    assert [weight for _, weight in provenance["files"]] == pytest.approx(result.weights, rel=1e-5)
    assert set(written) == set(newest_metadata) | {"modelspec.title", "ss_post_hoc_ema", "sshs_legacy_hash"}


def test_hashes_of_a_large_merge_cover_the_legacy_window(tmp_path):
    """Above 1 MiB the legacy hash reads tensor bytes, so it must match an independent hash too."""
    paths = []
    for seed in range(2):
        tensors = lora_tensors(seed + 1)
        tensors["big.lora_down.weight"] = torch.randn(300_000, generator=torch.Generator().manual_seed(seed))
        metadata = {"ss_output_name": "big", "modelspec.description": "not hashed " * 50}
        paths.append(write_lora(tmp_path, f"big{seed}.safetensors", seed + 1, seed, tensors=tensors, metadata=metadata))
    output = str(tmp_path / "big.safetensors")
    result = post_hoc_ema_merge(paths, output)
    merged = load_file(output)
    hashes = (result.metadata["sshs_model_hash"], result.metadata["sshs_legacy_hash"])
    assert hashes == independent_hashes(merged, result.metadata)
    assert hashes[1] != "e3b0c442"


def test_newest_file_without_metadata_still_records_the_merge(tmp_path):
    paths = [write_lora(tmp_path, "old.safetensors", 1, 0), write_lora(tmp_path, "new.safetensors", 2, 1, metadata={})]
    result = post_hoc_ema_merge(paths, str(tmp_path / "o.safetensors"))
    assert set(result.metadata) == {"ss_post_hoc_ema", "sshs_model_hash", "sshs_legacy_hash"}
    assert safetensors_io.read_header(result.output_file)[1] == result.metadata


def test_keys_only_in_the_oldest_file_pass_through(tmp_path):
    first = lora_tensors(1)
    first["blocks.3.extra.lora_down.weight"] = torch.randn(2, 3)
    paths = [write_lora(tmp_path, "old.safetensors", 1, 0, tensors=first),
             write_lora(tmp_path, "new.safetensors", 2, 1)]
    output = str(tmp_path / "o.safetensors")
    post_hoc_ema_merge(paths, output)
    merged = load_file(output)
    assert torch.equal(merged["blocks.3.extra.lora_down.weight"], first["blocks.3.extra.lora_down.weight"])
    assert torch.equal(merged["step_counter"], first["step_counter"])


class LoadTracker:
    """Wraps the file reader to see how many files are open and how many files' tensors are alive at once."""

    def __init__(self, real_iter_tensors):
        self.real_iter_tensors = real_iter_tensors
        self.open_handles = 0
        self.max_open_handles = 0
        self.loaded = []  # (path, weak reference, bytes) of float weights handed out
        self.max_files_alive = 0
        self.max_bytes_alive = 0

    def __call__(self, path, names=None):
        def tracked():
            self.open_handles += 1
            self.max_open_handles = max(self.max_open_handles, self.open_handles)
            try:
                for name, tensor in self.real_iter_tensors(path, names):
                    self.record(path, name, tensor)
                    yield name, tensor
            finally:
                self.open_handles -= 1

        return tracked()

    def record(self, path, name, tensor):
        if tensor.is_floating_point() and not name.endswith(".alpha"):
            self.loaded.append((path, weakref.ref(tensor), tensor.numel() * tensor.element_size()))
        alive = [(path, size) for path, ref, size in self.loaded if ref() is not None]
        self.max_files_alive = max(self.max_files_alive, len({path for path, _ in alive}))
        self.max_bytes_alive = max(self.max_bytes_alive, sum(size for _, size in alive))


def test_files_are_read_one_at_a_time(tmp_path, run_files, monkeypatch):
    paths, by_mtime = run_files
    tracker = LoadTracker(safetensors_io.iter_tensors)
    monkeypatch.setattr(safetensors_io, "iter_tensors", tracker)
    post_hoc_ema_merge(paths, str(tmp_path / "m.safetensors"))

    weights_per_file = [name for name, t in lora_tensors(1).items() if t.is_floating_point() and not name.endswith(".alpha")]
    assert len(tracker.loaded) == len(paths) * len(weights_per_file)  # every weight went through the tracked reader
    one_file_bytes = sum(t.numel() * t.element_size() for name, t in lora_tensors(1).items() if name in weights_per_file)
    largest_tensor = max(t.numel() * 4 for t in lora_tensors(1).values())
    assert tracker.max_open_handles == 1
    assert tracker.max_files_alive <= 2
    assert tracker.max_bytes_alive <= one_file_bytes + largest_tensor < 2 * one_file_bytes


def listing(folder):
    return sorted(os.listdir(folder))


def bad_input_cases():
    """(build(tmp_path) -> (paths, output, options), fragments the message must contain)."""

    def two(tmp, **options):
        a = write_lora(tmp, "a.safetensors", 1, 0)
        b = write_lora(tmp, "b.safetensors", 2, 1)
        return [a, b], str(tmp / "out.safetensors"), options

    def with_second(tmp, tensors):
        a = write_lora(tmp, "a.safetensors", 1, 0)
        b = write_lora(tmp, "b.safetensors", 2, 1, tensors=tensors)
        return [a, b], str(tmp / "out.safetensors"), {}

    def changed(update):
        tensors = lora_tensors(2)
        tensors.update(update)
        return tensors

    def text_file(tmp):
        a = write_lora(tmp, "a.safetensors", 1, 0)
        (tmp / "notes.safetensors").write_text("not a model")
        return [a, str(tmp / "notes.safetensors")], str(tmp / "out.safetensors"), {}

    def existing_output(tmp):
        paths, output, options = two(tmp)
        with open(output, "wb") as file:
            file.write(b"keep me")
        return paths, output, options

    def output_is_input(tmp):
        paths, _, options = two(tmp)
        return paths, os.path.join(str(tmp), ".", "b.safetensors"), options

    return {
        "no files": (lambda tmp: ([], str(tmp / "out.safetensors"), {}), ["no checkpoints"]),
        "one file": (lambda tmp: ([write_lora(tmp, "a.safetensors", 1, 0)], str(tmp / "out.safetensors"), {}),
                     ["need at least two checkpoints", "a.safetensors"]),
        "missing file": (lambda tmp: (two(tmp)[0] + [str(tmp / "gone.safetensors")], str(tmp / "out.safetensors"), {}),
                         ["gone.safetensors", "not found"]),
        "not safetensors": (text_file, ["notes.safetensors", "not a readable safetensors"]),
        "not a lora": (lambda tmp: with_second(tmp, {"model.weight": torch.zeros(2, 2)}),
                       ["b.safetensors", "not a LoRA", "lora_down.weight"]),
        "extra key": (lambda tmp: with_second(tmp, changed({"blocks.9.new.lora_up.weight": torch.zeros(3, 4)})),
                      ["blocks.9.new.lora_up.weight", "b.safetensors", "a.safetensors"]),
        "shape mismatch": (lambda tmp: with_second(tmp, changed({"blocks.2.proj.lora_down.weight": torch.zeros(8, 8)})),
                           ["blocks.2.proj.lora_down.weight", "a.safetensors", "b.safetensors", "[4, 8]", "[8, 8]"]),
        "float vs int": (lambda tmp: with_second(tmp, changed({"step_counter": torch.zeros(2)})),
                         ["step_counter", "I64", "F32"]),
        "alpha mismatch": (lambda tmp: with_second(tmp, changed({"blocks.1.ffn.alpha": torch.tensor(8.0)})),
                           ["blocks.1.ffn.alpha", "a.safetensors", "b.safetensors", "network_alpha"]),
        "output is an input": (output_is_input, ["is one of the input checkpoints"]),
        "output exists": (existing_output, ["out.safetensors", "already exists"]),
        "output folder missing": (lambda tmp: (two(tmp)[0], str(tmp / "nowhere" / "o.safetensors"), {}), ["does not exist"]),
        "beta too large": (lambda tmp: two(tmp, beta=1.5), ["beta=1.5", "[0, 1]"]),
        "beta2 negative": (lambda tmp: two(tmp, beta2=-0.1), ["beta2=-0.1", "[0, 1]"]),
        "sigma_rel too large": (lambda tmp: two(tmp, sigma_rel=0.4), ["sigma_rel=0.4", "0.30028"]),
    }


@pytest.mark.parametrize("case", list(bad_input_cases()))
def test_bad_input_is_refused_before_anything_is_written(tmp_path, case, monkeypatch):
    build, fragments = bad_input_cases()[case]
    paths, output, options = build(tmp_path)
    before = listing(tmp_path)
    existing = open(output, "rb").read() if os.path.isfile(output) else None

    def no_writing(*args, **kwargs):
        raise AssertionError("tried to write although the input is bad")

    monkeypatch.setattr(safetensors_io, "atomic_save_file", no_writing)
    with pytest.raises(MusubiError) as error:
        post_hoc_ema_merge(paths, output, **options)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert listing(tmp_path) == before
    if existing is not None:
        assert open(output, "rb").read() == existing


def test_overwrite_replaces_an_existing_output(tmp_path, run_files):
    paths, by_mtime = run_files
    output = tmp_path / "out.safetensors"
    output.write_bytes(b"old")
    post_hoc_ema_merge(paths, str(output), overwrite=True)
    assert_bitwise_equal(load_file(output), reference_merge(by_mtime, musubi_linear_betas(5, 0.95, 0.95)))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "musubi", "ema-merge", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


def test_cli_merges_overwrites_and_reports_weights(tmp_path, run_files):
    paths, by_mtime = run_files
    output = tmp_path / "cli.safetensors"
    output.write_bytes(b"old")  # the CLI overwrites like lora_post_hoc_ema.py
    finished = run_cli(*paths, "--output_file", str(output), "--beta", "0.9", "--beta2", "0.99")
    assert finished.returncode == 0, finished.stderr
    betas = musubi_linear_betas(5, 0.9, 0.99)
    assert_bitwise_equal(load_file(output), reference_merge(by_mtime, betas))

    report = [line for line in finished.stdout.splitlines() if line.strip().endswith(".safetensors") and "Saved" not in line]
    assert [line.split()[-1] for line in report] == by_mtime
    printed = [float(line.split()[0]) for line in report]
    assert printed == pytest.approx(effective_weights(betas), abs=1e-6)



def test_cli_reports_bad_input_as_an_error(tmp_path, capsys):
    only = write_lora(tmp_path, "a.safetensors", 1, 0)
    assert cli.main(["ema-merge", only, "--output_file", str(tmp_path / "x.safetensors"), "--sigma_rel", "0.2"]) == 2
    assert "need at least two checkpoints" in capsys.readouterr().err
    assert listing(tmp_path) == ["a.safetensors"]


# --- choosing a run's step checkpoints ---------------------------------------------------------


def training_folder(root, run: str, steps, final_step=None, state_steps=()):
    """What the trainer leaves: step checkpoints, the final LoRA and (older layout) state folders."""
    folder = root / run
    folder.mkdir(parents=True)
    paths = [write_lora(folder, f"{run}-step{step:06d}.safetensors", step, step) for step in steps]
    final = write_lora(folder, f"{run}.safetensors", 9, 99, metadata={"ss_steps": str(final_step or steps[-1])})
    states = []
    for step in state_steps:
        (folder / f"{run}-step{step:06d}-state").mkdir()
        states.append(write_lora(folder / f"{run}-step{step:06d}-state", "network.safetensors", step, step))
    return paths, final, states


def test_selection_keeps_one_runs_step_checkpoints_and_says_what_it_left_out(tmp_path):
    steps, final, states = training_folder(tmp_path, "my_lora", [1, 2, 3], state_steps=[2, 3])
    choice = select_run_checkpoints(sorted(steps + [final] + states))
    assert choice.files == steps
    reasons = dict(choice.left_out)
    assert set(reasons) == {final, *states}
    assert reasons[final] == "the final LoRA of run 'my_lora': the same step 3 as my_lora-step000003.safetensors"
    assert all("resume state folder" in reasons[state] for state in states)

    # A final LoRA of a step that was not saved as a checkpoint is pointed out, and kept when named.
    steps, final, _ = training_folder(tmp_path, "odd", [100, 200], final_step=250)
    choice = select_run_checkpoints(steps + [final])
    assert choice.files == steps and "step 250, not a step checkpoint" in dict(choice.left_out)[final]
    assert select_run_checkpoints(steps + [final], named=[final]).files == steps + [final]

    # Files named some other way are not filtered.
    other = [write_lora(tmp_path, name, 1, 1) for name in ("a.safetensors", "b.safetensors")]
    assert select_run_checkpoints(other) == CheckpointChoice(other, [])


def test_selection_refuses_a_mixture_of_runs_naming_them(tmp_path):
    first, _, _ = training_folder(tmp_path, "my_lora", [1, 2])
    second, _, _ = training_folder(tmp_path, "my_lora_2", [1, 2, 3])
    with pytest.raises(MusubiError) as error:
        select_run_checkpoints(first + second)
    message = str(error.value)
    assert "2 training runs" in message
    assert f"'my_lora' in {tmp_path / 'my_lora'} (2 checkpoints, steps 1–2)" in message
    assert f"'my_lora_2' in {tmp_path / 'my_lora_2'} (3 checkpoints, steps 1–3)" in message
