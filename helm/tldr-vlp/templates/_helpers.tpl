{{- define "tldr-vlp.labels" -}}
app.kubernetes.io/name: tldr-vlp
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "tldr-vlp.mlflowName" -}}
{{ .Release.Name }}-mlflow
{{- end }}

{{/* The Host headers MLflow answers (--allowed-hosts; it refuses others against DNS rebinding): its
Service's names, and localhost for `kubectl port-forward`. */}}
{{- define "tldr-vlp.mlflowHosts" -}}
{{- $name := include "tldr-vlp.mlflowName" . }}
{{- $port := .Values.mlflow.port }}
{{- $ns := .Release.Namespace }}
{{- printf "%s:%v,%s.%s:%v,%s.%s.svc:%v,%s.%s.svc.cluster.local:%v,localhost:*,127.0.0.1:*" $name $port $name $ns $port $name $ns $port $name $ns $port }}
{{- end }}

{{- define "tldr-vlp.stageImage" -}}
{{ .Values.stage.image.repository }}:{{ .Values.stage.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The pipeline's pod config, read by dags/tldr_dagkit/settings.py (TLDR_KUBERNETES_CONFIG). */}}
{{- define "tldr-vlp.podConfig" -}}
{
  "namespace": {{ .Release.Namespace | toJson }},
  "in_cluster": true,
  "kubernetes_conn_id": {{ .Values.airflow.kubernetesConnId | toJson }},
  "image": {{ include "tldr-vlp.stageImage" . | toJson }},
  "image_pull_policy": {{ .Values.stage.image.pullPolicy | toJson }},
  "image_pull_secrets": {{ .Values.stage.imagePullSecrets | toJson }},
  "service_account_name": {{ .Values.stage.serviceAccount.name | toJson }},
  "labels": {"app.kubernetes.io/instance": {{ .Release.Name | toJson }}},
  "run_as_user": {{ .Values.stage.runAsUser }},
  "node_selector": {{ .Values.stage.nodeSelector | toJson }},
  "gpu_node_selector": {{ .Values.stage.gpuNodeSelector | toJson }},
  "tolerations": {{ .Values.stage.tolerations | toJson }},
  "gpu_tolerations": {{ .Values.stage.gpuTolerations | toJson }},
  "env": {{ merge (dict "MLFLOW_TRACKING_URI" (printf "http://%s.%s.svc:%v" (include "tldr-vlp.mlflowName" .) .Release.Namespace .Values.mlflow.port)) .Values.stage.extraEnv | toJson }},
  "secret_env_from": {{ .Values.stage.secretEnvFrom | toJson }},
  "startup_timeout_seconds": {{ .Values.stage.startupTimeoutSeconds }},
  "stage_resources": {{ .Values.stage.stageResources | toJson }}
}
{{- end }}
