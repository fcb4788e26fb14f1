{{/* Name: RELEASE-relay (with release "clusterconnect": the name of deploy/k8s/relay.yaml). */}}
{{- define "clusterconnect-relay.name" -}}
{{- printf "%s-relay" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector: the name alone, as in deploy/k8s before the chart (a Deployment's selector cannot change). */}}
{{- define "clusterconnect-relay.labels" -}}
app.kubernetes.io/name: {{ include "clusterconnect-relay.name" . }}
app.kubernetes.io/component: relay
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: clusterconnect
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* OTEL_* for each container (docs/tracing.md): the collector's endpoint, then any further variables. */}}
{{- define "clusterconnect-relay.tracingEnv" -}}
{{- with .Values.tracing.otlpEndpoint }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- range $name, $value := .Values.tracing.env }}
- {name: {{ $name }}, value: {{ $value | quote }}}
{{- end }}
{{- end -}}
