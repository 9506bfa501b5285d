{{- define "parley.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end }}

{{- define "parley.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "parley.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "parley.selectorLabels" . }}
{{- end }}

{{- define "parley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "parley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "parley.secretName" -}}
{{- if .Values.existingSecret -}}
{{- .Values.existingSecret -}}
{{- else -}}
{{- include "parley.fullname" . -}}
{{- end -}}
{{- end }}

{{- define "parley.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end }}

{{/* Environment of every Parley container: secrets and extra variables. */}}
{{- define "parley.env" -}}
- name: PARLEY_API_KEYS
  valueFrom:
    secretKeyRef: {name: {{ include "parley.secretName" . }}, key: PARLEY_API_KEYS, optional: true}
- name: PARLEY_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef: {name: {{ include "parley.secretName" . }}, key: PARLEY_WEBHOOK_SECRET, optional: true}
{{- if .Values.turn.urls }}
- name: PARLEY_TURN_SERVERS
  value: {{ join "," .Values.turn.urls | quote }}
- name: PARLEY_TURN_SECRET
  valueFrom:
    secretKeyRef: {name: {{ include "parley.secretName" . }}, key: PARLEY_TURN_SECRET, optional: true}
{{- end }}
{{- if eq .Values.mode "split" }}
- name: PARLEY_NODE_SECRET
  valueFrom:
    secretKeyRef: {name: {{ include "parley.secretName" . }}, key: PARLEY_NODE_SECRET}
{{- end }}
{{- if .Values.env }}
{{ toYaml .Values.env }}
{{- end }}
{{- end }}

{{/* Privileged init container raising the node's UDP buffer limits. */}}
{{- define "parley.sysctlInit" -}}
- name: sysctl
  image: {{ include "parley.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["sh", "-c", "for k in rmem_max wmem_max optmem_max; do echo 16777216 > /proc/sys/net/core/$k; done"]
  securityContext:
    privileged: true
    runAsNonRoot: false
    runAsUser: 0
{{- end }}

{{/* The signaling Service's /media-node endpoint, which media nodes dial (split mode). */}}
{{- define "parley.signalingUrl" -}}
ws://{{ include "parley.fullname" . }}.{{ .Release.Namespace }}.svc:{{ .Values.service.port }}/media-node
{{- end }}
