"""The GPU machine's one script is checked here first: its shell syntax, and the sanitizer cases it
runs under compute-sanitizer, executed on the CPU kernels."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_gpu_session_script_parses():
    result = subprocess.run(["bash", "-n", os.path.join(ROOT, "scripts", "gpu_session.sh")], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("sha256sum") is None, reason="no bash or sha256sum")
def test_sources_hash_follows_every_source_of_the_extension(tmp_path):
    """A carried build is used only when device_carry/sources.sha256 holds this hash: it must change
    with any file under csrc/ or setup.py, and only with those."""
    tree = tmp_path / "tree"
    shutil.copytree(os.path.join(ROOT, "csrc"), tree / "csrc")
    shutil.copy(os.path.join(ROOT, "setup.py"), tree / "setup.py")
    (tree / "README.md").write_text("x")

    def sources_hash():
        result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_session.sh"), "--sources-hash"],
                                cwd=tree, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        digest = result.stdout.strip()
        assert len(digest) == 64 and int(digest, 16) >= 0
        return digest

    first = sources_hash()
    assert sources_hash() == first
    (tree / "README.md").write_text("y")
    assert sources_hash() == first
    with open(tree / "csrc" / "cuda" / "launch.cuh", "a") as f:
        f.write("// changed\n")
    second = sources_hash()
    assert second != first
    with open(tree / "setup.py", "a") as f:
        f.write("# changed\n")
    assert sources_hash() not in (first, second)


def test_sanitizer_cases_run_on_the_cpu_kernels():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sanitize_cases.py"), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "masked_crf/cpu: ok" in result.stdout and "attentive_similarity/cpu: ok" in result.stdout
    assert "spatial_attention/aten: ok" in result.stdout
