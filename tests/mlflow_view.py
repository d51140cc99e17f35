"""What the MLflow UI shows of a sweep, read through the tracking server's REST API (the calls the UI
makes): the experiment typed for training, the sweep's parent run with its trial runs nested under it,
each trial's registered model (and, when asked, its alias), the report's plots on the parent.

Used by the end-to-end tests; also runnable against any server::

    python -m tests.mlflow_view http://127.0.0.1:5000 smoke
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request


def rest(uri: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET (or POST ``body``) ``/api/2.0/mlflow/<endpoint>`` and return the decoded JSON answer."""
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or b"{}")


def _tags(entity: dict) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in entity.get("tags", [])}


def sweep_view(uri: str, experiment: str) -> dict:
    """``{"kind", "parent", "children", "plots", "models"}`` of sweep ``experiment`` as the UI sees it:
    experiment kind tag, the parent run (the one with role ``sweep``), its nested runs by name, the
    report files on the parent, and ``{trial: registered model}`` from the registry."""
    found = rest(uri, "experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs = rest(uri, "runs/search", {"experiment_ids": [found["experiment_id"]], "max_results": 1000}).get("runs", [])
    parents = [r for r in runs if _tags(r["data"]).get("sors.run_role") == "sweep"]
    assert len(parents) == 1, f"expected one sweep run, got {len(parents)}"
    parent = parents[0]["info"]["run_id"]
    children = {r["info"]["run_name"]: r for r in runs if _tags(r["data"]).get("mlflow.parentRunId") == parent}
    report = rest(uri, "artifacts/list", run_id=parent, path="report").get("files", [])
    models = {}
    for name in children:
        answer = rest(uri, "registered-models/search", filter=f"name = '{experiment}.{name}'")
        models[name] = (answer.get("registered_models") or [None])[0]
    return {
        "kind": _tags(found).get("mlflow.experimentKind"),
        "parent": parent,
        "children": children,
        "plots": sorted(f["path"] for f in report if f["path"].endswith(".png")),
        "models": models,
    }


def main(argv: list[str]) -> int:
    """Print the view; exit 1 when the experiment is not typed for training or a trial has no model."""
    uri, experiment = argv[0], argv[1]
    view = sweep_view(uri, experiment)
    print(
        f"experiment {experiment}: kind {view['kind']}, parent run {view['parent']}, "
        f"{len(view['children'])} trial run(s), plots {view['plots']}"
    )
    for name, model in view["models"].items():
        print(
            f"  {name}: registered model {model and model['name']}, "
            f"aliases {[a['alias'] for a in (model or {}).get('aliases', [])]}"
        )
    ok = view["kind"] == "custom_model_development" and all(view["models"].values()) and view["plots"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
