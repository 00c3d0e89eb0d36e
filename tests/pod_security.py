"""The restricted Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/),
checked field by field on a rendered pod spec: the stage pods (test_k8s_pods) and the chart's (test_helm)."""

from __future__ import annotations

# Volume types the restricted Pod Security Standard allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}


def assert_restricted(pod_spec: dict, uid: int) -> None:
    """Every field of the restricted profile, on the pod and on every container (sidecars too)."""
    pod_ctx = pod_spec["securityContext"]
    assert pod_ctx["runAsNonRoot"] is True and pod_ctx["runAsUser"] == uid != 0
    assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not any(pod_spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    for container in pod_spec["containers"] + pod_spec.get("initContainers", []):
        ctx = container["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and not ctx.get("privileged"), container["name"]
        assert ctx["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert ctx.get("runAsNonRoot", True) is True and ctx.get("runAsUser", uid) == uid
        assert ctx.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
    for volume in pod_spec.get("volumes", []):
        assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, volume
