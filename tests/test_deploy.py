"""deploy/: the Kubernetes manifest validates against the Kubernetes schemas (kubernetes-validate ships them: no
network), and says what the image and the README say."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

MANIFEST = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "pupil.yaml"


def test_manifest_validates_strictly_against_the_kubernetes_schemas(tmp_path):
    exe = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    r = subprocess.run([exe, "--strict", str(MANIFEST)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == 3
    broken = tmp_path / "broken.yaml"  # the validator really validates: a typo in a field name fails
    broken.write_text(MANIFEST.read_text().replace("containerPort: 3000", "containerport: 3000"))
    assert subprocess.run([exe, "--strict", str(broken)], capture_output=True, text=True).returncode != 0


def test_manifest_runs_the_service_as_the_image_expects():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    assert set(docs) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1034
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz" and c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["ports"][0]["containerPort"] == 3000
    assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
    assert docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"] == docs["Deployment"]["metadata"]["name"]


def test_manifest_keeps_a_secret_and_a_read_only_root():
    """The token comes from a Secret mounted as a file (PUPIL_API_TOKEN_FILE points into it); the root filesystem
    is read-only, with an emptyDir wherever the service writes (/tmp and BentoML's metrics folder: the container
    test checks it writes nowhere else, with the same environment)."""
    from deploy.check import READ_ONLY_ENV, RUNTIME_FILES

    pod = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d["kind"] == "Deployment")["spec"]["template"]
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    secret_dir = next(p for p, n in mounts.items() if "secret" in volumes[n])
    assert env["PUPIL_API_TOKEN_FILE"].startswith(secret_dir + "/") and "PUPIL_API_TOKEN" not in env
    assert "PUPIL_AUTH" not in env
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    for key, value in READ_ONLY_ENV.items():
        assert env[key] == value
    writable = {p for p, n in mounts.items() if "emptyDir" in volumes[n]}
    assert writable == {"/tmp", "/home/bentoml/prometheus_multiproc_dir"}
    assert all(any(w.rstrip("/") + "/" == f or f.startswith(w + "/") for w in writable)
               for f in RUNTIME_FILES if f.startswith(("/tmp", "/home")))


def test_a_container_build_keeps_the_newest_images_and_removes_the_older_ones(tmp_path, monkeypatch):
    """deploy.buildah.prune_builds against a stand-in `buildah` (the real one is the container test's, in CI): the
    newest `keep` images of the name stay, and the one tagged latest, other names are never touched, and an image
    buildah refuses to remove (a container uses it) is not reported as removed."""
    import json
    import os

    from deploy.buildah import prune_builds

    name = "localhost/pupil-service"
    images = [{"id": f"id{i}", "names": [f"{name}:t{i}"], "created": 1000 + i} for i in range(6)]
    images[5]["names"].append(f"{name}:latest")  # the newest, tagged twice
    images[0]["names"] = [f"{name}:t0", f"{name}:latest"]  # an old one that latest still points at
    images.append({"id": "base", "names": ["localhost/pupil-base:bookworm"], "created": 1})
    images.append({"id": "idbusy", "names": [f"{name}:busy"], "created": 999})
    (tmp_path / "images.json").write_text(json.dumps(images))
    fake = tmp_path / "buildah"
    fake.write_text(f"""#!/bin/sh
shift 2  # --storage-driver DRIVER
case "$1" in
  images) cat {tmp_path}/images.json ;;
  rmi) echo "$2" >> {tmp_path}/rmi.log; [ "$2" != idbusy ] ;;
  *) exit 3 ;;
esac
""")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PUPIL_BUILDAH_DRIVER", "vfs")
    removed = prune_builds(name, keep=3)
    asked = (tmp_path / "rmi.log").read_text().split()
    assert asked == ["id2", "id1", "idbusy"]  # newest first: id5, id4, id3 kept; id0 is latest; base is not ours
    assert removed == [f"{name}:t2", f"{name}:t1"]


def test_the_memory_of_a_process_tree_counts_a_child_between_fork_and_exec_once():
    """A child started by subprocess shows its parent's resident pages until it exec's (vfork shares the parent's
    memory): counted, a 1 GB server read as 2 GB the instant it started a decode worker, and a CI run failed on it.
    Here a pool that replaces its worker after every decode starts 60 of them under a sampler."""
    import io
    import os
    import threading

    import numpy as np
    from PIL import Image

    from deploy.check import rss_mb
    from models.decoder import DecodePool
    from pupil.server import process_tree

    held = np.ones(400 * 2**20, dtype=np.uint8)  # resident here, so a sample that counts a copy reads 400 MB more
    buf = io.BytesIO()
    Image.new("L", (64, 64), 200).save(buf, format="PNG")
    samples, done, started = [], threading.Event(), set()

    def sample():
        while not done.is_set():
            pids = process_tree(os.getpid())
            started.update(pids)
            samples.append(rss_mb(pids))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with DecodePool(workers=2, max_tasks=1) as pool:
            for _ in range(60):
                assert pool.square(buf.getvalue(), 32).shape == (32, 32, 3)
    finally:
        done.set()
        sampler.join()
    assert len(started) > 30  # the sampler saw the workers come and go
    low, high = min(samples), max(samples)
    assert low > 400 and high - low < 200, f"{low:.0f} to {high:.0f} MiB over {len(samples)} samples"
    assert held[-1] == 1
