from conftest import rlhf


def test_help_lists_every_stage():
    out = rlhf("--help").stdout
    for stage in ("data", "sft", "reward", "ppo", "rl", "eval", "recommend", "label", "export", "pipeline"):
        assert stage in out


def test_label_and_export_on_an_empty_run_name_what_is_missing(tmp_path):
    cases = [
        (["label", "serve", "--run", tmp_path, "--round", "1"], "rlhf label export --run"),
        (["label", "import", "--run", tmp_path, "--round", "1"], "rlhf label export --run"),
        (["export", "--run", tmp_path, "--out", tmp_path / "x"], "rlhf sft --run"),
    ]
    for args, hint in cases:
        proc = rlhf(*args, "--model", "tiny", check=False)
        assert proc.returncode == 1, proc.stderr
        assert hint in proc.stderr and "Traceback" not in proc.stderr
    proc = rlhf("label", "export", "--run", tmp_path, "--round", "0", check=False)
    assert proc.returncode == 2 and "rounds are numbered" in proc.stderr


def test_missing_inputs_name_the_command_that_makes_them(tmp_path):
    proc = rlhf("sft", "--run", tmp_path / "empty", "--model", "tiny", check=False)
    assert proc.returncode == 1
    assert "rlhf data prepare --out" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = rlhf("ppo", "--run", tmp_path / "empty", "--model", "tiny", check=False)
    assert proc.returncode == 1 and "rlhf sft --run" in proc.stderr


def test_config_errors_exit_2_without_traceback(tmp_path):
    proc = rlhf("sft", "--run", tmp_path, "max_steps=-5", check=False)
    assert proc.returncode == 2
    assert "sft.max_steps" in proc.stderr and "Traceback" not in proc.stderr
    proc = rlhf("nosuchstage", check=False)
    assert proc.returncode == 2
