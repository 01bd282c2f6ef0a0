import re


def readme_commands(repo):
    return re.findall(r"```bash\n# \d\..*\n(.*)\n```", (repo / "README.md").read_text())


def test_readme_has_the_two_commands_and_ci_runs_the_test_one(repo):
    main_job, tests = readme_commands(repo)
    assert ".venv" in main_job and "latentlab" in main_job
    assert "pytest" in tests
    assert tests in (repo / ".ci" / "run").read_text().splitlines()
