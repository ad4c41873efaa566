"""Developer sessions: ``nox -s tests`` (the README test command), tests against each supported PEFT minor,
PEFT's own DoRA test cases with the patch applied, and lint.

torch is pinned to the CPU build that lies on the development machines' disk (``torch==2.13.0``); pass
``--torch <spec>`` after ``--`` to change it, e.g. ``nox -s tests -- --torch "torch==2.11.0"``.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["lint", "tests"]

PEFT_VERSIONS = ["0.18.1", "0.19.1", "0.20.0", "0.21.2"]
TORCH = "torch==2.13.0"


def _torch_spec(session: nox.Session) -> str:
    args = list(session.posargs)
    return args[args.index("--torch") + 1] if "--torch" in args else TORCH


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test command of the README."""
    session.install(_torch_spec(session), "-e", ".[test]")
    session.run("python", "-m", "pytest", "-q", env={"DORAFACTORS_REQUIRE_TEST_EXTRAS": "1"})


@nox.session(python="3.11")
@nox.parametrize("peft", PEFT_VERSIONS)
def tests_peft(session: nox.Session, peft: str) -> None:
    """Our suite against one supported PEFT release."""
    session.install(_torch_spec(session), "-e", ".[test]", f"peft=={peft}")
    session.run("python", "-m", "pytest", "-q", "-x", "tests/layers", "tests/norm", "tests/test_patching.py")


@nox.session(python="3.11")
@nox.parametrize("peft", PEFT_VERSIONS)
def peft_oracle(session: nox.Session, peft: str) -> None:
    """PEFT's own ``tests/test_custom_models.py -k dora`` from its sdist, stock and patched: same outcome."""
    session.install(
        _torch_spec(session), "-e", ".[test]", f"peft=={peft}", "diffusers", "scipy", "parameterized", "datasets"
    )
    tmp = session.create_tmp()
    session.run("python", "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"peft=={peft}", "-d", tmp)
    session.run("tar", "xzf", f"{tmp}/peft-{peft}.tar.gz", "-C", tmp, external=True)
    root = f"{tmp}/peft-{peft}"
    session.run("touch", f"{root}/tests/__init__.py", external=True)
    # Three cases need the Hugging Face Hub (gpt2, opt-125m): deselected on machines without it.
    hub = [
        "test_gpt2_dora_merge_and_unload",
        "test_gpt2_dora_merge_and_unload_safe_merge",
        "test_dora_save_and_load_remapping",
    ]
    deselect = [f"--deselect=tests/test_custom_models.py::TestPeftCustomModel::{name}" for name in hub]
    common = [
        "python",
        "-m",
        "pytest",
        "tests/test_custom_models.py",
        "-k",
        "dora and not delora",
        "-o",
        "addopts=",
        "-q",
        "-p",
        "no:cacheprovider",
        *deselect,
    ]
    session.chdir(root)
    session.run(*common, env={"PYTHONPATH": f"{session.invoked_from}/tests/peft_oracle"})
    session.run(
        *common, "-p", "dorafactors_patch_plugin", env={"PYTHONPATH": f"{session.invoked_from}/tests/peft_oracle"}
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
