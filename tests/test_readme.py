import re

from tests.conftest import REPO


def readme_commands():
    return re.findall(r"```bash\n# \d\..*\n(.*)\n```", (REPO / "README.md").read_text())


def test_readme_has_the_two_commands_and_ci_runs_the_test_one():
    main_job, tests = readme_commands()
    assert ".venv" in main_job and "latentlab" in main_job
    assert "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()
