"""The names the project puts into Python's import system, beside the packages its users also have.

The ops are `fastgpt.kernels` (the repository's top-level kernels/ folder, mapped by pyproject.toml's
package-dir); the bare name `kernels` belongs to Hugging Face's package, which transformers imports. These
tests run the commands from directories inside and outside the repository, with this editable install and
with a wheel installed into a fresh virtualenv, and check that no name of ours shadows, or is shadowed by,
an installed distribution.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, checkout_copy, fresh_venv, pip_install, tiny_flags

# what the repository puts on sys.path: the root (python -m from a checkout, pytest's pythonpath) and tests/
# (pytest's rootdir-relative imports); each name there must be ours alone
ROOT_NAMES = sorted(p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file())
TEST_NAMES = sorted(p.stem for p in (ROOT / "tests").glob("*.py"))


def python(code: str, cwd: Path, exe: str = sys.executable, **env) -> subprocess.CompletedProcess:
    return subprocess.run([exe, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_the_repository_holds_the_names_it_should():
    assert ROOT_NAMES == ["bench", "fastgpt", "kernels"]


def test_no_installed_distribution_provides_a_name_of_ours():
    """`bench` and the test helpers are imported from the checkout, never installed: an installed
    distribution with the same top-level name would be shadowed by them (or shadow them), so none may exist.
    `fastgpt` may come only from this project."""
    installed = importlib.metadata.packages_distributions()
    taken = {name: sorted(set(installed.get(name, [])) - {"fastgpt"}) for name in ["fastgpt", "bench", *TEST_NAMES]}
    assert not {name: owners for name, owners in taken.items() if owners}
    assert "kernels" not in TEST_NAMES and "fastgpt" not in installed.get("kernels", [])


def test_bare_kernels_from_the_root_is_hugging_faces():
    """From the repository's root the folder kernels/ is on sys.path under the bare name; it hands that name
    to Hugging Face's package, which the tests' environment has (transformers 5 depends on it)."""
    result = python("import kernels, fastgpt.kernels as k; print(kernels.__file__); print(callable(k.set_backend))",
                    cwd=ROOT)
    assert result.returncode == 0, result.stderr
    hf, ours = result.stdout.split()
    assert not Path(hf).resolve().is_relative_to(ROOT) and Path(hf).parent.name == "kernels" and ours == "True"
    assert importlib.metadata.distribution("kernels").read_text("top_level.txt") in (None, "kernels\n")


def test_bare_kernels_without_hugging_faces_is_absent():
    """With no other `kernels` on sys.path, importing the bare name fails as it would for any missing module,
    and fastgpt.kernels still imports."""
    code = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p or 'torch' in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('absent', e.name)\n"
            "import sys; print('kernels' in sys.modules)")
    result = python(code, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["absent", "kernels", "False"]


def run_the_pipeline(exe: str, cwd: Path, work: Path, corpus: Path) -> None:
    """train -> sample -> export hf -> transformers' AutoModelForCausalLM, and the nanoGPT export and import,
    run from `cwd` with the interpreter `exe`, writing under `work`."""
    def module(name: str, *args: str) -> str:
        result = subprocess.run([exe, "-m", name, *args], cwd=cwd, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, f"{name}: {result.stderr[-3000:]}"
        return result.stdout

    run, hf, nano = work / "run", work / "hf", work / "nano"
    module("fastgpt.train", f"--data_file={corpus}", f"--data_dir={work / 'data'}", f"--out_dir={run}",
           *tiny_flags(max_iters=4, eval_interval=2))
    assert "ROMEO" in module("fastgpt.sample", f"--out_dir={run}", "--prompt=ROMEO", "--num_samples=1",
                             "--max_new_tokens=8", "--device=cpu")
    module("fastgpt.export", f"--checkpoint={run / 'best.pt'}", "--format=hf", f"--out={hf}")
    module("fastgpt.export", f"--checkpoint={run / 'best.pt'}", "--format=nanogpt", f"--out={nano}")
    module("fastgpt.export", f"--checkpoint={nano / 'ckpt.pt'}", "--format=fastgpt", f"--meta={nano / 'meta.pkl'}",
           f"--out={work / 'back'}")
    assert "ROMEO" in module("fastgpt.sample", f"--out_dir={work / 'back'}", "--prompt=ROMEO", "--num_samples=1",
                             "--max_new_tokens=8", "--device=cpu")
    code = ("import sys, kernels, torch, transformers as t\n"
            "m = t.AutoModelForCausalLM.from_pretrained(sys.argv[1]); tok = t.AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "ids = torch.tensor([tok.encode('ROMEO')])\n"
            "print(m.generate(ids, max_new_tokens=4, do_sample=False).shape[1], kernels.__file__)")
    result = subprocess.run([exe, "-c", code, str(hf)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    length, hf_kernels = result.stdout.split()
    assert length == "9" and not Path(hf_kernels).resolve().is_relative_to(ROOT)


@pytest.mark.parametrize("where", ["outside", "root"])
def test_the_editable_install_works_from_any_directory(where, tmp_path, small_corpus):
    """From the root, the bare `kernels` that transformers imports is Hugging Face's, and the ops are ours."""
    cwd = ROOT if where == "root" else tmp_path
    run_the_pipeline(sys.executable, cwd, tmp_path, small_corpus)


def test_the_wheel_installs_only_fastgpt_and_runs_beside_hugging_faces_kernels(tmp_path, small_corpus):
    src = checkout_copy(tmp_path / "src")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("fastgpt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    version = wheel.name.split("-")[1]
    assert {n.split("/")[0] for n in names} == {"fastgpt", f"fastgpt-{version}.dist-info"}
    assert {n for n in names if n.startswith("fastgpt/kernels/")} >= {
        f"fastgpt/kernels/{p.name}" for p in (ROOT / "kernels").glob("*.py")}

    exe = fresh_venv(tmp_path / "venv")
    pip_install(exe, str(wheel))
    where = python("import fastgpt, fastgpt.kernels, kernels; print(fastgpt.__file__, kernels.__file__)",
                   cwd=tmp_path, exe=exe)
    assert where.returncode == 0, where.stderr
    ours, hf = map(Path, where.stdout.split())
    assert ours.is_relative_to(tmp_path / "venv") and not hf.is_relative_to(tmp_path) and hf.parent.name == "kernels"
    run_the_pipeline(exe, tmp_path, tmp_path, small_corpus)


def test_an_offline_editable_install_runs_the_report_as_on_the_gpu_machine(tmp_path):
    """The README's GPU preparation: a copy of the checkout, `pip install --no-deps --no-build-isolation -e .`
    with no index, then `python -m bench.report` from it, which imports fastgpt.kernels."""
    src = checkout_copy(tmp_path / "checkout")
    exe = fresh_venv(tmp_path / "venv")
    pip_install(exe, "-e", str(src))
    result = python("import fastgpt.kernels, bench.report; print(fastgpt.kernels.__file__)", cwd=src, exe=exe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Path(result.stdout.strip()) == src / "kernels" / "__init__.py"
    help_text = subprocess.run([exe, "-m", "bench.report", "--help"], cwd=src, capture_output=True, text=True)
    assert help_text.returncode == 0 and "--budget_s" in help_text.stdout, help_text.stderr
