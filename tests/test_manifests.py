"""The KubeRay manifests in cluster/, checked without a Kubernetes or a Ray cluster.

- Every RayCluster / RayJob / RayService is validated against the `v1` schema of KubeRay's own
  CRDs (v1.7.0, in ../shared/kuberay-crds/), made as strict as the API server is about field names.
- The Serve config the RayService embeds, and serve/config.yaml, are validated with Ray's own
  Serve schema (ray.serve.schema) and their `args` with leaf_ray.config.ServingConfig.
- A few rules that the KubeRay operator enforces in code rather than in the schema, and the
  contracts between the manifests, the image (cluster/Dockerfile) and the repository.
"""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from leaf_ray.config import PipelineConfig, ServingConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
CRD_DIR = ROOT.parent / "shared" / "kuberay-crds"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"

RAY_MANIFESTS = {"RayCluster": "raycluster.yaml", "RayJob": "rayjob.yaml", "RayService": "rayservice.yaml"}
# Kinds in cluster/ that are not KubeRay's. No schema for them lies here; they are only named.
CORE_KINDS = {("v1", "PersistentVolumeClaim")}
# YAML in cluster/ that is not a Kubernetes manifest: the RayJob's pipeline config.
NOT_MANIFESTS = {"pipeline-gpu.yaml"}
GPU = "nvidia.com/gpu"
DNS_1035_LABEL = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=yaml.CSafeLoader) if doc]


def manifest(kind: str) -> dict:
    """The one document of `kind` in its file under cluster/."""
    (doc,) = [doc for doc in load_documents(CLUSTER / RAY_MANIFESTS[kind]) if doc["kind"] == kind]
    return doc


# --- CRD schemas -------------------------------------------------------------------------------

def kubernetes_strict(schema: dict) -> dict:
    """A copy of an OpenAPI v3 schema from a CRD that jsonschema checks the way the API server does.

    - Unknown fields. A structural schema lists an object's `properties` but does not forbid
      others: jsonschema would accept `rayStartParam` or `minReplica` as an unknown extra key. The
      API server does not: kubectl's default strict field validation rejects unknown fields (and
      without it they are pruned, so the setting is silently lost). So every object schema that
      lists `properties` and says nothing else about extra keys gets `additionalProperties: false`.
      `x-kubernetes-preserve-unknown-fields: true` is the CRD's own way to allow any key: such
      schemas stay open, as do free-form maps (`additionalProperties: {type: string}`).
    - `x-kubernetes-int-or-string: true` accepts an integer or a string (`cpu: 1`, `cpu: "500m"`):
      controller-gen writes it with `anyOf: [integer, string]`, added here where a schema lacks it.
    - `nullable: true` (OpenAPI, not JSON Schema) also accepts null.
    - The API server fills in `default`s before it validates, so a required field with a default
      (a worker group's minReplicas, maxReplicas) is never missing: it is not required here.
    """
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: kubernetes_strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        if "required" in out:
            out["required"] = [name for name in out["required"] if "default" not in out["properties"].get(name, {})]
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = kubernetes_strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = kubernetes_strict(out["items"])
    for combinator in ("anyOf", "allOf", "oneOf"):
        if combinator in out:
            out[combinator] = [kubernetes_strict(sub) for sub in out[combinator]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the `v1` openAPIV3Schema of each KubeRay CRD, as shipped."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (the shared/ folder beside the repository)")
    schemas = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        for crd in load_documents(path):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            for version in crd["spec"]["versions"]:
                if version["name"] == "v1":
                    key = (f"{crd['spec']['group']}/v1", crd["spec"]["names"]["kind"])
                    schemas[key] = version["schema"]["openAPIV3Schema"]
    assert {kind for _, kind in schemas} >= set(RAY_MANIFESTS), f"CRDs in {CRD_DIR}: {sorted(schemas)}"
    return schemas


@pytest.fixture(scope="module")
def validators(crd_schemas) -> dict[tuple[str, str], jsonschema.Validator]:
    # OpenAPI 3.0 schema objects are JSON Schema draft 4 with extensions.
    return {key: jsonschema.Draft4Validator(kubernetes_strict(schema)) for key, schema in crd_schemas.items()}


def schema_errors(doc: dict, validators) -> list[str]:
    """Why the API server would reject `doc`, one line per problem; [] when it is valid."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in validators:
        return [f"no KubeRay CRD serves apiVersion {key[0]!r}, kind {key[1]!r}; known: {sorted(validators)}"]
    errors = sorted(validators[key].iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def all_cluster_documents() -> list[tuple[str, dict]]:
    """(file name, document) of every Kubernetes manifest in cluster/."""
    return [(path.name, doc) for path in sorted(CLUSTER.glob("*.yaml")) if path.name not in NOT_MANIFESTS
            for doc in load_documents(path)]


def test_each_kuberay_kind_has_a_manifest():
    kinds = [doc["kind"] for _, doc in all_cluster_documents() if doc["apiVersion"].startswith("ray.io/")]
    assert sorted(kinds) == sorted(RAY_MANIFESTS)


@pytest.mark.parametrize("name,doc", all_cluster_documents(),
                         ids=lambda v: v if isinstance(v, str) else v.get("kind", "document"))
def test_manifest_is_valid_for_its_crd(name, doc, validators):
    assert {"apiVersion", "kind", "metadata"} <= set(doc), f"{name}: not a Kubernetes manifest"
    if not doc["apiVersion"].startswith("ray.io/"):
        assert (doc["apiVersion"], doc["kind"]) in CORE_KINDS, f"{name}: unexpected {doc['apiVersion']} {doc['kind']}"
        return
    assert RAY_MANIFESTS[doc["kind"]] == name, f"a {doc['kind']} belongs in cluster/{RAY_MANIFESTS[doc['kind']]}"
    # RayCluster names become pod and Service names: KubeRay requires a DNS-1035 label.
    assert DNS_1035_LABEL.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 53
    assert schema_errors(doc, validators) == []


def changed(doc: dict, path: tuple, *, rename: str | None = None, value=None) -> dict:
    """A deep copy of `doc` with the key at `path` renamed to `rename`, or its value replaced."""
    doc = copy.deepcopy(doc)
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if rename is not None:
        parent[rename] = parent.pop(path[-1])
    else:
        parent[path[-1]] = value
    return doc


WORKER = ("workerGroupSpecs", 0)
WORKER_CONTAINER = (*WORKER, "template", "spec", "containers", 0)


@pytest.mark.parametrize("kind,path,typo", [
    ("RayCluster", ("spec", "headGroupSpec", "rayStartParams"), "rayStartParam"),
    ("RayCluster", ("spec", *WORKER, "minReplicas"), "minReplica"),
    ("RayJob", ("spec", "shutdownAfterJobFinishes"), "shutdownAfterJobFinish"),
    ("RayJob", ("spec", "rayClusterSpec", "autoscalerOptions", "idleTimeoutSeconds"), "idleTimeoutSecond"),
    ("RayService", ("spec", "rayClusterConfig", *WORKER_CONTAINER, "volumeMounts"), "volumeMount"),
])
def test_misspelt_field_is_rejected(kind, path, typo, validators, crd_schemas):
    doc = changed(manifest(kind), path, rename=typo)
    errors = schema_errors(doc, validators)
    assert len(errors) == 1 and f"'{typo}' was unexpected" in errors[0], errors
    assert errors[0].startswith(".".join(map(str, path[:-1])) + ":")
    # The CRD schema as shipped says nothing about the typo: the strictness above is what catches it.
    shipped = jsonschema.Draft4Validator(crd_schemas[(doc["apiVersion"], kind)])
    assert not [e.message for e in shipped.iter_errors(doc) if f"'{typo}'" in e.message]


@pytest.mark.parametrize("kind,path,value", [
    ("RayCluster", ("spec", *WORKER, "maxReplicas"), "4"),                     # int32, not a string
    ("RayCluster", ("spec", "headGroupSpec", "rayStartParams", "num-cpus"), 0),  # a map of strings
    ("RayCluster", ("spec", "autoscalerOptions", "version"), "v3"),             # enum v1 | v2
    ("RayCluster", ("spec", *WORKER_CONTAINER, "resources", "limits", GPU), "one"),  # not a quantity
    ("RayJob", ("spec", "shutdownAfterJobFinishes"), "yes"),                   # boolean
    ("RayService", ("spec", "serveConfigV2"), {"applications": []}),           # a YAML string
])
def test_wrong_type_is_rejected(kind, path, value, validators):
    errors = schema_errors(changed(manifest(kind), path, value=value), validators)
    assert len(errors) == 1 and errors[0].startswith(".".join(map(str, path)) + ":"), errors


def test_int_or_string_quantity_takes_both(validators):
    limits = ("spec", *WORKER_CONTAINER, "resources", "limits")
    doc = changed(manifest("RayCluster"), (*limits, GPU), value=1)
    doc = changed(doc, (*limits, "memory"), value="48Gi")
    assert schema_errors(doc, validators) == []


def test_unknown_api_version_or_kind_is_rejected(validators):
    for api_version, kind in [("ray.io/v1alpha1", "RayCluster"), ("ray.io/v1", "RayClustr")]:
        doc = {**manifest("RayCluster"), "apiVersion": api_version, "kind": kind}
        assert schema_errors(doc, validators)[0].startswith("no KubeRay CRD serves")


# --- cluster specs: what the KubeRay operator checks in code, and what this project needs ------

CLUSTER_SPECS = {
    "RayCluster": lambda: manifest("RayCluster")["spec"],
    "RayJob": lambda: manifest("RayJob")["spec"]["rayClusterSpec"],
    "RayService": lambda: manifest("RayService")["spec"]["rayClusterConfig"],
}


def pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def gpus_per_pod(group: dict) -> int:
    return int(group["template"]["spec"]["containers"][0]["resources"].get("limits", {}).get(GPU, 0))


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@pytest.mark.parametrize("kind", CLUSTER_SPECS)
def test_cluster_spec_cpu_head_and_autoscaled_gpu_group(kind):
    spec = CLUSTER_SPECS[kind]()
    # No tasks or actors on the head: Ray reads rayStartParams as strings, so "0", not 0.
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["version"] == "v2"
    # KubeRay rejects the v2 env var next to autoscalerOptions.version, and autoscaler v2 pods
    # must not restart in place (restartPolicy Never or unset).
    head_env = {e["name"] for e in spec["headGroupSpec"]["template"]["spec"]["containers"][0].get("env", [])}
    assert "RAY_enable_autoscaler_v2" not in head_env
    assert all(pod.get("restartPolicy", "Never") == "Never" for pod in pod_specs(spec))

    gpu_groups = [g for g in spec["workerGroupSpecs"] if gpus_per_pod(g) > 0]
    assert gpu_groups, "no worker group asks for nvidia.com/gpu"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > group["minReplicas"], "an autoscaled group needs room to grow"

    if spec.get("authOptions", {}).get("mode") == "token":
        assert version_tuple(spec["rayVersion"]) >= (2, 52, 0), "KubeRay's token auth needs Ray >= 2.52.0"


@pytest.mark.parametrize("kind", CLUSTER_SPECS)
def test_cluster_spec_volumes_resolve(kind):
    claims = {doc["metadata"]["name"] for _, doc in all_cluster_documents() if doc["kind"] == "PersistentVolumeClaim"}
    for pod in pod_specs(CLUSTER_SPECS[kind]()):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{container['name']} mounts undefined volume {mount['name']}"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, "claim not defined in cluster/"


# --- the image -------------------------------------------------------------------------------

DOCKERFILE = CLUSTER / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    lines = [line.strip() for line in DOCKERFILE.read_text(encoding="utf-8").splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def image_workdir() -> str:
    (workdir,) = [arg for op, arg in dockerfile_instructions() if op == "WORKDIR"]
    return workdir


def test_one_ray_version_and_one_image_everywhere():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    (ray_pin,) = {m for dep in pyproject["project"]["optional-dependencies"]["gpu"]
                  for m in re.findall(r"^ray\[[^]]*\]==([\d.]+)$", dep)}
    (base_image,) = [arg.split("=", 1)[1] for op, arg in dockerfile_instructions() if op == "ARG"
                     and arg.startswith("RAY_IMAGE=")]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray_pin)}-py311-(gpu|cu\d+)", base_image), base_image

    images = set()
    for kind, spec in CLUSTER_SPECS.items():
        assert spec()["rayVersion"] == ray_pin, kind
        images |= {c["image"] for pod in pod_specs(spec()) for c in pod["containers"]}
    assert len(images) == 1, f"head, workers and all three manifests run one image: {images}"


def copied_sources() -> list[str]:
    """The repository paths the Dockerfile copies into the image's working directory."""
    return [source for op, arg in dockerfile_instructions() if op == "COPY"
            for source in [word for word in arg.split() if not word.startswith("--")][:-1]]


def in_image(path: str) -> bool:
    """Whether a path relative to the repository root is in the image (by a COPY)."""
    return any(path == source.rstrip("/") or path.startswith(source.rstrip("/") + "/") for source in copied_sources())


def test_dockerfile_copies_what_exists():
    for source in copied_sources():
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
    assert in_image("jobs/pipeline.py") and in_image("leaf_ray/serving/app.py") and in_image("serve/config.yaml")
    assert not in_image("runs/demo")


# --- the RayJob ------------------------------------------------------------------------------

def rayjob_pipeline() -> tuple[list[str], PipelineConfig]:
    """The RayJob's entrypoint argv and the pipeline config it names."""
    argv = shlex.split(manifest("RayJob")["spec"]["entrypoint"])
    config = argv[argv.index("--config") + 1]
    assert in_image(config), f"--config {config}: not copied into the image"
    return argv, load_config(ROOT / config, PipelineConfig)  # raises, naming each bad field


def test_rayjob_runs_the_pipeline_from_the_image():
    argv, config = rayjob_pipeline()
    assert argv[0] == "python" and argv[1].startswith("jobs/")
    assert (ROOT / argv[1]).is_file(), f"entrypoint names {argv[1]}, which is not in the repository"
    assert in_image(argv[1])
    # The cluster has GPU pods only: every stage of the job asks for a GPU.
    assert config.scoring.resources.num_gpus >= 1 and config.distillation.use_gpu
    assert config.serving is None or config.serving.resources.num_gpus >= 1

    spec = manifest("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def test_rayjob_runtime_env_is_valid():
    env = yaml.safe_load(manifest("RayJob")["spec"]["runtimeEnvYAML"])
    assert isinstance(env, dict) and env
    # RuntimeEnv takes any other key as a plugin name, so a misspelt field must be caught here.
    assert set(env) <= RuntimeEnv.known_fields, set(env) - RuntimeEnv.known_fields
    RuntimeEnv(**env)  # Ray's own type checks (env_vars: Dict[str, str], ...)
    # The code runs from the image's working directory, where runs/ is the shared volume; an
    # uploaded working_dir would move the job's relative output paths off it.
    assert "working_dir" not in env


# --- Serve configs ---------------------------------------------------------------------------

def keys_serve_ignores(raw, parsed, path: str = "") -> list[str]:
    """Keys of `raw` that are gone from `parsed` (its model_dump(exclude_unset=True)).

    Ray's Serve schema ignores unknown fields without a word, so a misspelt `route_prefx` or
    `num_replica` would quietly fall back to its default; these are such keys.
    """
    if isinstance(raw, dict) and isinstance(parsed, dict):
        return [found for key, value in raw.items()
                for found in ([f"{path}{key}"] if key not in parsed else
                              keys_serve_ignores(value, parsed[key], f"{path}{key}."))]
    if isinstance(raw, list) and isinstance(parsed, list) and len(raw) == len(parsed):
        return [found for i, (r, p) in enumerate(zip(raw, parsed)) for found in keys_serve_ignores(r, p, f"{path}{i}.")]
    return []


def validate_serve_config(raw: dict) -> ServeDeploySchema:
    """Ray's schema, no ignored keys, and each application's args as a ServingConfig."""
    schema = ServeDeploySchema.model_validate(raw)
    assert keys_serve_ignores(raw, schema.model_dump(exclude_unset=True)) == []
    for app in schema.applications:
        ServingConfig.model_validate(app.args)
    return schema


def rayservice_serve_config() -> dict:
    serve_config = manifest("RayService")["spec"]["serveConfigV2"]
    assert isinstance(serve_config, str)
    return yaml.safe_load(serve_config)


def test_serve_config_file_is_valid():
    assert SERVE_CONFIG.is_file(), "serve/config.yaml is missing"
    validate_serve_config(yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8")))


def test_rayservice_serve_config_is_valid():
    schema = validate_serve_config(rayservice_serve_config())
    # The serve Service sends traffic to the pods' IPs; Serve's default host is loopback.
    assert schema.http_options.host == "0.0.0.0"


def test_misspelt_serve_field_is_caught():
    raw = copy.deepcopy(rayservice_serve_config())
    raw["applications"][0]["route_prefx"] = raw["applications"][0].pop("route_prefix")
    parsed = ServeDeploySchema.model_validate(raw)  # Ray's schema alone accepts it
    assert keys_serve_ignores(raw, parsed.model_dump(exclude_unset=True)) == ["applications.0.route_prefx"]

    raw["applications"][0]["args"]["max_replica"] = 4
    with pytest.raises(ValueError, match="max_replica"):
        ServingConfig.model_validate(raw["applications"][0]["args"])


def test_rayservice_serves_the_serve_app_on_gpus():
    (local,) = yaml.safe_load(SERVE_CONFIG.read_text(encoding="utf-8"))["applications"]
    (app,) = rayservice_serve_config()["applications"]
    assert (app["name"], app["import_path"], app["route_prefix"]) == (
        local["name"], local["import_path"], local["route_prefix"])
    serving = ServingConfig.model_validate(app["args"])
    assert serving.dtype == "bfloat16" and serving.resources.num_gpus >= 1

    spec = manifest("RayService")["spec"]["rayClusterConfig"]
    (group,) = [g for g in spec["workerGroupSpecs"] if gpus_per_pod(g) > 0]
    # The autoscaler can place every engine replica Serve may ask for, and min_replicas of them at once.
    per_pod = gpus_per_pod(group) // serving.resources.num_gpus
    assert group["maxReplicas"] * per_pod >= serving.max_replicas
    assert group["minReplicas"] * per_pod >= serving.min_replicas

    # The API key is a Secret mounted as a file in every Ray container (the ingress replica runs
    # anywhere), and in no container's environment.
    assert serving.api_key_file and not serving.api_key_env
    key_dir, key_name = serving.api_key_file.rsplit("/", 1)
    for pod in pod_specs(spec):
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == key_dir]
        assert mount["readOnly"] is True
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["secret"]["secretName"] == "leaf-ray-api-key" and key_name == "api-key"
        assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in pod["containers"][0].get("env", []))

    # The GPU pods are ready and alive by the app's own /health, on the Serve port.
    container = group["template"]["spec"]["containers"][0]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": 8000}
    assert container["livenessProbe"]["periodSeconds"] * container["livenessProbe"]["failureThreshold"] >= 300

    # Model paths: on the volume every GPU pod mounts, or in the image (copied from the repo).
    workdir = image_workdir()
    mounts = [m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]]
    for path in filter(None, [serving.model, serving.teacher]):
        assert path.startswith(workdir + "/"), f"{path}: use an absolute path in the image's {workdir}"
        relative = path.removeprefix(workdir + "/")
        on_volume = any(path.startswith(mount + "/") for mount in mounts)
        assert on_volume or (in_image(relative) and (ROOT / relative).exists()), \
            f"{path} is neither on a mounted volume nor in the image"
    # ... and the model is the LeaF student the RayJob writes (runs/<name>/distill/<variant>/model).
    _, pipeline = rayjob_pipeline()
    assert "leaf" in pipeline.variants
    assert serving.model == f"{workdir}/{pipeline.layout.model('leaf')}"


@pytest.mark.parametrize("kind", CLUSTER_SPECS)
def test_every_pod_runs_unprivileged(kind):
    for pod in pod_specs(CLUSTER_SPECS[kind]()):
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] != 0
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_the_rayjob_has_a_deadline_and_bounded_retries():
    spec = manifest("RayJob")["spec"]
    assert 0 < spec["activeDeadlineSeconds"] <= 24 * 3600
    assert 0 <= spec["backoffLimit"] <= 3
