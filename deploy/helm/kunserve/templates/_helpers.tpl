{{/*
Names, labels, images and fixed ports shared by the templates.
The ports and labels of what the operator creates come from operator/kunserve/operator/naming.py
(tests/deploy checks that they agree).
*/}}

{{- define "kunserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kunserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kunserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "ctx" $ "component" "operator"). */}}
{{- define "kunserve.labels" -}}
helm.sh/chart: {{ include "kunserve.chart" .ctx }}
{{ include "kunserve.selectorLabels" . }}
app.kubernetes.io/part-of: kunserve
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "kunserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kunserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Labels the operator puts on what it creates (naming.labels / selector_labels). */}}
{{- define "kunserve.operatorManaged" -}}
app.kubernetes.io/managed-by: kunserve-operator
{{- end -}}

{{- define "kunserve.agentGrpcPort" -}}50051{{- end -}}
{{- define "kunserve.agentMetricsPort" -}}9400{{- end -}}
{{- define "kunserve.gatewayHttpPort" -}}8000{{- end -}}
{{- define "kunserve.redisPort" -}}6379{{- end -}}

{{- define "kunserve.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{- define "kunserve.controlImage" -}}
{{- include "kunserve.image" (dict "ctx" . "image" .Values.images.control) -}}
{{- end -}}

{{- define "kunserve.agentImage" -}}
{{- include "kunserve.image" (dict "ctx" . "image" .Values.images.agent) -}}
{{- end -}}

{{- define "kunserve.operatorServiceAccount" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "kunserve.fullname" .)) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kunserve.redisName" -}}
{{- printf "%s-redis" (include "kunserve.fullname" .) -}}
{{- end -}}

{{/* The Redis URL as a plain value, or empty when it comes from a Secret. */}}
{{- define "kunserve.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%s/0" (include "kunserve.redisName" .) .Release.Namespace (include "kunserve.redisPort" .) -}}
{{- else if not .Values.redis.existingSecret.name -}}
{{- required "redis.externalUrl (or redis.existingSecret.name) is required when redis.enabled is false" .Values.redis.externalUrl -}}
{{- end -}}
{{- end -}}

{{/* env entry KUNSERVE_REDIS_URL */}}
{{- define "kunserve.redisEnv" -}}
- name: KUNSERVE_REDIS_URL
{{- if and (not .Values.redis.enabled) .Values.redis.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.existingSecret.name }}
      key: {{ .Values.redis.existingSecret.key }}
{{- else }}
  value: {{ include "kunserve.redisUrl" . | quote }}
{{- end }}
{{- end -}}

{{- define "kunserve.apiKeysSecret" -}}
{{- default (printf "%s-api-keys" (include "kunserve.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{- define "kunserve.tlsSecret" -}}
{{- default (printf "%s-tls" (include "kunserve.fullname" .)) .Values.tls.secretName -}}
{{- end -}}

{{- define "kunserve.tlsDir" -}}/etc/kunserve/tls{{- end -}}

{{/* --tls-* flags of kunserve operator / gateway (the gRPC client side). */}}
{{- define "kunserve.tlsClientArgs" -}}
- --tls-cert={{ include "kunserve.tlsDir" . }}/tls.crt
- --tls-key={{ include "kunserve.tlsDir" . }}/tls.key
- --tls-ca={{ include "kunserve.tlsDir" . }}/ca.crt
- --tls-server-name={{ .Values.tls.serverName }}
{{- end -}}

{{- define "kunserve.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "kunserve.tlsSecret" . }}
    defaultMode: 0440
{{- end -}}

{{- define "kunserve.tlsMount" -}}
- name: tls
  mountPath: {{ include "kunserve.tlsDir" . }}
  readOnly: true
{{- end -}}
