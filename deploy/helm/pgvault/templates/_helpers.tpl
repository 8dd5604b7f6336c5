{{/* The name every object of the release shares. */}}
{{- define "pgvault.fullname" -}}
{{- if contains "pgvault" .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-pgvault" .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pgvault.labels" -}}
app.kubernetes.io/name: pgvault
app.kubernetes.io/component: fleet
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The variable a database's URL comes from (its _FILE twin names the Secret file). */}}
{{- define "pgvault.urlEnv" -}}
{{- printf "PGVAULT_DB_%s_URL" (regexReplaceAll "[^A-Z0-9]" (upper .name) "_") -}}
{{- end -}}

{{- define "pgvault.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "pgvault.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}
