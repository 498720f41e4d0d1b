"""The user's path on a core install (`pip install -e .`, no extras): every command's help, the default
job, and a clear line naming the extra where a command needs one.

The optional packages are made unimportable in a subprocess (their `sys.modules` entries set to None,
which makes `import x` fail as if x were not installed), so a new top-level import of an extra anywhere
on a command's path fails this file, whatever the developer's environment has installed.
"""

import json
import subprocess
import sys
import textwrap

import pytest

# Every package that is an extra of peftkit (pyproject.toml) or only a test / benchmark dependency and that
# no core dependency brings (httpx and psutil come with huggingface-hub and accelerate, so they are left out).
OPTIONAL_PACKAGES = ("fastapi", "uvicorn", "starlette", "peft", "datasets", "trl", "tensorboard", "mlflow", "wandb",
                     "hypothesis", "pytest", "flwr", "flwr_datasets", "ray")


def peftkit_without_extras(*args, timeout=600):
    """`peftkit ARGS` in a subprocess where none of OPTIONAL_PACKAGES can be imported."""
    program = textwrap.dedent(f"""
        import sys
        for name in {OPTIONAL_PACKAGES!r}:
            sys.modules[name] = None  # import name -> ModuleNotFoundError, as on a core install
        from peftkit.cli import main
        sys.exit(main({[str(a) for a in args]!r}))
    """)
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


def command_names():
    from peftkit.cli import build_parser

    parser = build_parser()
    subparsers = next(action for action in parser._actions if action.__class__.__name__ == "_SubParsersAction")
    return sorted(subparsers.choices)


def test_importing_peftkit_and_its_cli_imports_no_optional_package():
    program = ("import sys, peftkit, peftkit.cli; "
               f"print(sorted(m for m in {OPTIONAL_PACKAGES!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"imported at start: {result.stdout.strip()}"


def test_every_command_has_help_without_the_optional_packages():
    names = command_names()
    assert {"train", "eval", "predict", "inspect", "merge", "export", "serve", "combine", "compare", "federate"} <= set(names)
    result = peftkit_without_extras("--help")
    assert result.returncode == 0, result.stderr
    for name in names:
        result = peftkit_without_extras(name, "--help")
        assert result.returncode == 0, f"peftkit {name} --help failed:\n{result.stderr[-2000:]}"
        assert f"usage: peftkit {name}" in result.stdout


def test_serve_without_its_extra_names_the_extra_in_one_line(tmp_path):
    result = peftkit_without_extras("serve", "--adapters", tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert 'pip install "peftkit[serve]"' in result.stderr and "fastapi" in result.stderr
    assert "Traceback" not in result.stderr


def test_federate_without_its_extra_names_the_extra_in_one_line(tmp_path):
    result = peftkit_without_extras("federate", "--output-dir", tmp_path / "fed", "--rounds", "1")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert 'pip install "peftkit[federated]"' in result.stderr and "flwr" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_extra_in_the_library_names_the_extra():
    from peftkit.extras import MissingExtraError, require

    with pytest.raises(MissingExtraError, match=r'reading a thing needs the no_such_package_xyz package, which is not '
                                                r'installed: pip install no_such_package_xyz'):
        require("no_such_package_xyz", "reading a thing")


def test_train_and_eval_run_without_the_optional_packages(tiny_model_folder, tmp_path):
    """The default job's path (a single data file: a validation part is held out) on a core install."""
    data = tmp_path / "reviews.jsonl"
    rows = [{"text": f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i}", "label": i % 2} for i in range(60)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    run = tmp_path / "run"
    result = peftkit_without_extras("train", "--model", tiny_model_folder, "--task", data, "--output-dir", run,
                                    "--max-steps", "3", "--batch-size", "8", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "6 examples (10% of its training examples, stratified by label, seed 0) are held out" in result.stdout
    assert "no validation split)" not in result.stdout and "validation accuracy" in result.stdout
    job = json.loads((run / "job.json").read_text())
    assert job["validation_holdout"] == {"fraction": 0.1, "seed": 0, "examples": 6}
    scored = peftkit_without_extras("eval", run / "adapter", "--json")
    assert scored.returncode == 0, scored.stderr[-3000:]
    evaluation = json.loads(scored.stdout)
    # the same held-out examples, the same weights: the run's own validation accuracy
    assert evaluation["examples"] == 6
    assert evaluation["accuracy"] == pytest.approx(job["validation_accuracy"], abs=1e-6)
    remaining = json.loads(peftkit_without_extras("eval", run / "adapter", "--json", "--split", "train").stdout)
    assert remaining["examples"] == 54


def test_an_unknown_option_shows_the_subcommands_usage():
    result = peftkit_without_extras("train", "--no-such-option")
    assert result.returncode == 2
    assert "usage: peftkit train" in result.stderr
    assert "unrecognized arguments: --no-such-option" in result.stderr
