{{/* Names and labels shared by every template. */}}
{{- define "s3fp.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "s3fp.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "s3fp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "s3fp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "s3fp.labels" -}}
{{ include "s3fp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The Secret holding the admin token: the user's, or the chart's own. */}}
{{- define "s3fp.adminTokenSecret" -}}
{{- .Values.admin.token.existingSecret | default (printf "%s-admin-token" (include "s3fp.fullname" .)) -}}
{{- end -}}
