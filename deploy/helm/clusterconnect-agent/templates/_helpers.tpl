{{/* Names: RELEASE-agent and RELEASE-aadproxy (with release "clusterconnect": the names of deploy/k8s). */}}
{{- define "clusterconnect-agent.agentName" -}}
{{- printf "%s-agent" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clusterconnect-agent.authProxyName" -}}
{{- printf "%s-aadproxy" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "clusterconnect-agent.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "clusterconnect-agent.joinSecretName" -}}
{{- .Values.agent.join.existingSecret | default (include "clusterconnect-agent.agentName" .) -}}
{{- end -}}

{{- define "clusterconnect-agent.tlsSecretName" -}}
{{- .Values.authProxy.tls.secretName | default (printf "%s-tls" (include "clusterconnect-agent.authProxyName" .)) -}}
{{- end -}}

{{- define "clusterconnect-agent.authProxyAddress" -}}
{{- .Values.agent.authProxyAddress | default (printf "%s.%s.svc:%v" (include "clusterconnect-agent.authProxyName" .) .Release.Namespace .Values.authProxy.port) -}}
{{- end -}}

{{/* Labels of every object; the selector labels below are the name alone, as in deploy/k8s before the
chart (a Deployment's selector cannot change). */}}
{{- define "clusterconnect-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
app.kubernetes.io/part-of: clusterconnect
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "clusterconnect-agent.agentLabels" -}}
app.kubernetes.io/name: {{ include "clusterconnect-agent.agentName" . }}
app.kubernetes.io/component: agent
{{ include "clusterconnect-agent.labels" . }}
{{- end -}}

{{- define "clusterconnect-agent.authProxyLabels" -}}
app.kubernetes.io/name: {{ include "clusterconnect-agent.authProxyName" . }}
app.kubernetes.io/component: auth-proxy
{{ include "clusterconnect-agent.labels" . }}
{{- end -}}

{{- define "clusterconnect-agent.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end -}}

{{/* OTEL_* for each container (docs/tracing.md): the collector's endpoint, then any further variables. */}}
{{- define "clusterconnect-agent.tracingEnv" -}}
{{- with .Values.tracing.otlpEndpoint }}
- {name: OTEL_EXPORTER_OTLP_ENDPOINT, value: {{ . | quote }}}
{{- end }}
{{- range $name, $value := .Values.tracing.env }}
- {name: {{ $name }}, value: {{ $value | quote }}}
{{- end }}
{{- end -}}
