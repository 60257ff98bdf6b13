{{/* Names ---------------------------------------------------------------------------------- */}}

{{- define "pdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* KubeRay names pods and the head Service after the RayCluster: keep room for suffixes. */}}
{{- define "pdserve.rayClusterName" -}}
{{- include "pdserve.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The Service KubeRay creates for the head pod: "<RayCluster name>-head-svc". */}}
{{- define "pdserve.rayHeadService" -}}
{{- printf "%s-head-svc" (include "pdserve.rayClusterName" .) }}
{{- end }}

{{- define "pdserve.rayAddress" -}}
{{- printf "ray://%s.%s.svc:%d" (include "pdserve.rayHeadService" .) .Release.Namespace (.Values.ray.clientPort | int) }}
{{- end }}

{{- define "pdserve.redisName" -}}
{{- printf "%s-redis" (include "pdserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pdserve.configName" -}}
{{- printf "%s-config" (include "pdserve.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels ---------------------------------------------------------------------------------- */}}

{{- define "pdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pdserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pdserve
{{- end }}

{{/* Selector labels of one component: call with (dict "root" $ "component" "router"). */}}
{{- define "pdserve.componentSelectorLabels" -}}
{{ include "pdserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels and annotations of one component's pods: call with
(dict "root" $ "component" "router" ["annotations" (dict ...)]). */}}
{{- define "pdserve.podMetadata" -}}
labels:
  {{- include "pdserve.labels" .root | nindent 2 }}
  app.kubernetes.io/component: {{ .component }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- $annotations := merge (dict) (.annotations | default dict) (.root.Values.podAnnotations | default dict) }}
{{- with $annotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Settings -------------------------------------------------------------------------------- */}}

{{- define "pdserve.image" -}}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" (eq .Values.device "cuda"))) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* GPUs per worker actor (`--worker-gpus`): one. A worker at tensor parallelism N is N
rank actors, one GPU each, placed together on its pod (which requests N GPUs). */}}
{{- define "pdserve.workerGpus" -}}
{{- if eq .Values.device "cuda" }}
{{- 1 }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/* `--model` for every process; empty for the built-in default model. */}}
{{- define "pdserve.modelPath" -}}
{{- if eq .Values.model.source "pvc" }}
{{- if .Values.model.pvc.path }}
{{- printf "/models/%s" (.Values.model.pvc.path | trimPrefix "/") }}
{{- else }}
{{- "/models" }}
{{- end }}
{{- end }}
{{- end }}

{{/* redis:// URL without a password (builtin, or external without a password Secret). */}}
{{- define "pdserve.redisUrl" -}}
{{- if eq .Values.redis.mode "builtin" }}
{{- printf "redis://%s.%s.svc:%d/0" (include "pdserve.redisName" .) .Release.Namespace (.Values.redis.port | int) }}
{{- else if eq .Values.redis.mode "external" }}
{{- $ext := .Values.redis.external }}
{{- $scheme := ternary "rediss" "redis" $ext.tls }}
{{- $auth := "" }}
{{- if $ext.passwordSecret.name }}
{{- $auth = printf "%s:$(REDIS_PASSWORD)@" $ext.username }}
{{- else if $ext.username }}
{{- $auth = printf "%s@" $ext.username }}
{{- end }}
{{- $query := list }}
{{- if and $ext.tls $ext.tlsCASecret.name }}
{{- $query = append $query (printf "ssl_ca_certs=/etc/pdserve/redis-tls/ca/%s" $ext.tlsCASecret.key) }}
{{- end }}
{{- if and $ext.tls $ext.tlsClientSecret }}
{{- $query = concat $query (list "ssl_certfile=/etc/pdserve/redis-tls/client/tls.crt" "ssl_keyfile=/etc/pdserve/redis-tls/client/tls.key") }}
{{- end }}
{{- printf "%s://%s%s:%d/%d" $scheme $auth $ext.host ($ext.port | int) ($ext.db | int) }}
{{- with $query }}?{{ join "&" . }}{{ end }}
{{- end }}
{{- end }}

{{/* Redis TLS files (redis.external.tlsCASecret / tlsClientSecret) for every container that
talks to Redis: the router and the Ray workers. The URL's query names these paths. */}}
{{- define "pdserve.redisTLSMounts" -}}
{{- $ext := .Values.redis.external }}
{{- if and (eq .Values.redis.mode "external") $ext.tls }}
{{- if $ext.tlsCASecret.name }}
- name: redis-tls-ca
  mountPath: /etc/pdserve/redis-tls/ca
  readOnly: true
{{- end }}
{{- if $ext.tlsClientSecret }}
- name: redis-tls-client
  mountPath: /etc/pdserve/redis-tls/client
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "pdserve.redisTLSVolumes" -}}
{{- $ext := .Values.redis.external }}
{{- if and (eq .Values.redis.mode "external") $ext.tls }}
{{- with $ext.tlsCASecret.name }}
- name: redis-tls-ca
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with $ext.tlsClientSecret }}
- name: redis-tls-client
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{/* Resources of a worker pool's Ray container: the values' resources plus tensorParallelSize
GPUs on CUDA. Call with (dict "root" $ "pool" .Values.prefill). */}}
{{- define "pdserve.poolResources" -}}
{{- $res := deepCopy (.pool.resources | default dict) }}
{{- if eq .root.Values.device "cuda" }}
{{- $gpus := .pool.tensorParallelSize | int }}
{{- $limits := $res.limits | default dict }}
{{- $_ := set $limits .root.Values.gpuResourceName $gpus }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := $res.requests | default dict }}
{{- $_ := set $requests .root.Values.gpuResourceName $gpus }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/* Pod pieces ------------------------------------------------------------------------------ */}}

{{- define "pdserve.podSecurity" -}}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Environment of every pdserve container: the ConfigMap, plus the Redis password and Ray's
token from their Secrets. */}}
{{- define "pdserve.env" -}}
envFrom:
  - configMapRef:
      name: {{ include "pdserve.configName" . }}
{{- $redisPassword := and (eq .Values.redis.mode "external") .Values.redis.external.passwordSecret.name }}
{{- $rayToken := .Values.ray.authTokenSecret }}
{{- if or $redisPassword $rayToken.name }}
env:
{{- end }}
{{- if $redisPassword }}
  - name: REDIS_PASSWORD
    valueFrom:
      secretKeyRef:
        name: {{ .Values.redis.external.passwordSecret.name }}
        key: {{ .Values.redis.external.passwordSecret.key }}
  # Kubernetes expands $(REDIS_PASSWORD) here; the URL never appears in a process list.
  - name: PDSERVE_REDIS_URL
    value: {{ include "pdserve.redisUrl" . | quote }}
{{- end }}
{{- if $rayToken.name }}
  # Ray's token authentication (RAY_AUTH_MODE=token in the ConfigMap): Ray reads the token
  # from here in every Ray process and in the router, the Ray driver.
  - name: RAY_AUTH_TOKEN
    valueFrom:
      secretKeyRef:
        name: {{ $rayToken.name }}
        key: {{ $rayToken.key }}
{{- end }}
{{- end }}

{{/* The init container that imports the model into the cache before pdserve starts. */}}
{{- define "pdserve.importModelContainer" -}}
- name: import-model
  image: {{ include "pdserve.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["pdserve"]
  args:
    - import-model
    {{- with include "pdserve.modelPath" . }}
    - --model={{ . }}
    {{- end }}
  envFrom:
    - configMapRef:
        name: {{ include "pdserve.configName" . }}
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  volumeMounts:
    {{- include "pdserve.modelMounts" . | nindent 4 }}
{{- end }}

{{- define "pdserve.modelMounts" -}}
- name: model-cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}
{{- end }}

{{- define "pdserve.modelVolumes" -}}
- name: model-cache
{{- if .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- end }}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}

{{/* Checks the schema cannot express. */}}
{{- define "pdserve.validate" -}}
{{- if ne .Values.device "cuda" }}
{{- range $pool := list "prefill" "decode" }}
{{- if gt ((index $.Values $pool).tensorParallelSize | int) 1 }}
{{- fail (printf "%s.tensorParallelSize > 1 needs device: cuda (tensor parallelism maps to GPUs per pod)" $pool) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source is pvc: set model.pvc.claimName" }}
{{- end }}
{{- if and (eq .Values.redis.mode "external") (not .Values.redis.external.host) }}
{{- fail "redis.mode is external: set redis.external.host" }}
{{- end }}
{{- with .Values.redis.external }}
{{- if and (or .tlsCASecret.name .tlsClientSecret) (not .tls) }}
{{- fail "redis.external.tlsCASecret / tlsClientSecret need redis.external.tls: true" }}
{{- end }}
{{- end }}
{{- end }}
