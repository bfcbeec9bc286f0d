"""Load a KServe InferenceService (JSON on stdin) into the ``kserve`` package's ``V1beta1InferenceService``, in a
process of its own: importing kserve registers the KServe v2 gRPC protos, whose package and message names clash with
tritonclient's in one process ("Couldn't build proto file into descriptor pool"). tests/test_deploy.py runs it.

Prints JSON: ``error`` (None, or the first field the models have no place for), the model types of the service, its
predictor and first container, whether the predictor names a built-in runtime, and the predictor fields a pod spec
does not have.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any

import kserve
import kubernetes.client


class FieldError(ValueError):
    """A manifest field the kserve / Kubernetes client model has no place for, or a value of the wrong type."""


_PRIMITIVES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,),
               "ResourceQuantity": (str, int, float)}


def _model(data: Any, klass: Any, path: str) -> Any:
    """``data`` as an instance of ``klass``: a kserve or Kubernetes client model, or an OpenAPI type name such as
    ``list[V1Container]`` (kserve's spelling) or ``List[V1Container]`` (the Kubernetes client's).

    kserve's own ``ApiClient().deserialize`` cannot do it: it looks every type name up in ``kserve.models``, which
    holds no Kubernetes type (``V1ObjectMeta`` is an AttributeError in kserve 0.21), and like every OpenAPI client it
    drops keys it does not know. This walks the same ``openapi_types`` and ``attribute_map`` and refuses them.
    """
    if isinstance(klass, str):
        if (match := re.fullmatch(r"Optional\[(.*)\]", klass)) is not None:
            return _model(data, match[1], path)
        if (match := re.fullmatch(r"[Ll]ist\[(.*)\]", klass)) is not None:
            if not isinstance(data, list):
                raise FieldError(f"{path}: expected a list, got {data!r}")
            return [_model(item, match[1], f"{path}[{i}]") for i, item in enumerate(data)]
        if (match := re.fullmatch(r"dict\(([^,]*), (.*)\)|Dict\[([^,]*), (.*)\]", klass)) is not None:
            if not isinstance(data, dict):
                raise FieldError(f"{path}: expected a mapping, got {data!r}")
            return {key: _model(value, match[2] or match[4], f"{path}.{key}") for key, value in data.items()}
        if klass == "object":                                   # IntOrString and the like
            return data
        if klass in _PRIMITIVES:
            if (isinstance(data, bool) and klass != "bool") or not isinstance(data, _PRIMITIVES[klass]):
                raise FieldError(f"{path}: expected {klass}, got {data!r}")
            return data
        found = getattr(kserve.models, klass, None) or getattr(kubernetes.client.models, klass, None)
        if found is None:
            raise FieldError(f"{path}: unknown model type {klass}")
        klass = found
    if not isinstance(data, dict):
        raise FieldError(f"{path}: expected a {klass.__name__} mapping, got {data!r}")
    attributes = {key: attr for attr, key in klass.attribute_map.items()}
    unknown = sorted(set(data) - set(attributes))
    if unknown:
        raise FieldError(f"{path}: {klass.__name__} has no field {', '.join(unknown)}")
    return klass(**{attributes[key]: _model(value, klass.openapi_types[attributes[key]], f"{path}.{key}")
                    for key, value in data.items()})


def load(doc: dict[str, Any]) -> dict[str, Any]:
    """The report above; the model must also serialize back to exactly ``doc``."""
    predictor_only = sorted(set(kserve.V1beta1PredictorSpec.attribute_map.values())
                            - set(kubernetes.client.V1PodSpec.attribute_map.values()))
    try:
        isvc = _model(doc, kserve.V1beta1InferenceService, "InferenceService")
    except (ValueError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}", "predictor_only_fields": predictor_only}
    if kserve.ApiClient().sanitize_for_serialization(isvc) != doc:
        return {"error": "the model does not round-trip the manifest", "predictor_only_fields": predictor_only}
    predictor = isvc.spec.predictor
    return {"error": None, "predictor_only_fields": predictor_only,
            "types": [type(isvc).__name__, type(predictor).__name__, type(predictor.containers[0]).__name__],
            "built_in_runtime": predictor.model is not None or predictor.triton is not None}


if __name__ == "__main__":
    json.dump(load(json.load(sys.stdin)), sys.stdout)
