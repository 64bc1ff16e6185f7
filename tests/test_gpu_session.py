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


def test_sanitizer_cases_run_on_the_cpu_kernels():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "sanitize_cases.py"), "--device", "cpu"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "masked_crf/cpu: ok" in result.stdout and "attentive_similarity/cpu: ok" in result.stdout
    assert "spatial_attention/aten: ok" in result.stdout
