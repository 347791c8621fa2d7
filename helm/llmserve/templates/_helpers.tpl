{{/* Names and labels. */}}
{{- define "llmserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llmserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "llmserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "llmserve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "llmserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llmserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llmserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: llmserve
{{- end }}

{{/* Pods of the serving cluster that run a gateway replica (what the Service selects). */}}
{{- define "llmserve.gatewaySelectorLabels" -}}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/component: serve
llmserve.io/gateway: "true"
{{- end }}

{{- define "llmserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{- define "llmserve.apiKeysSecret" -}}
{{- .Values.existingSecret | default (printf "%s-api-keys" (include "llmserve.fullname" .)) }}
{{- end }}

{{- define "llmserve.engineSecret" -}}
{{- .Values.engineSecret.existingSecret | default (printf "%s-engine" (include "llmserve.fullname" .)) }}
{{- end }}

{{- define "llmserve.gatewayPort" -}}
{{- dig "gateway" "port" 8000 .Values.serve | int }}
{{- end }}

{{/*
serveConfigV2: one Serve application per model (serve.engine.app:build) and the gateway
(serve.gateway.deployment:build), Serve's own HTTP proxy disabled. route_prefix is null: no app is
reached through a Serve proxy. The gateway's replicas are pinned to Ray nodes labelled
llmserve.io/gateway=true (the pods the Service selects) through a Serve deployment override.
*/}}
{{- define "llmserve.serveConfigV2" -}}
{{- $ns := dig "ray" "namespace" "llmserve" .Values.serve }}
{{- $apps := list }}
{{- range .Values.serve.models }}
{{- $apps = append $apps (dict "name" .name "import_path" "serve.engine.app:build" "route_prefix" nil
      "args" (dict "model" . "namespace" $ns)) }}
{{- end }}
{{- $gatewayActor := dict "num_cpus" 0 "label_selector" (dict "llmserve.io/gateway" "true") }}
{{- $gateway := dict "name" "gateway" "import_path" "serve.gateway.deployment:build" "route_prefix" nil
      "args" (dict "config" .Values.serve "replicas" (int .Values.gateway.replicas))
      "deployments" (list (dict "name" "gateway" "ray_actor_options" $gatewayActor)) }}
{{- toYaml (dict "proxy_location" "Disabled" "applications" (append $apps $gateway)) }}
{{- end }}

{{/*
One Ray pod template. Params: root (.), group (head or a worker group's values), nodeType
(head|worker), component (serve|batch), gateway (bool: this pod hosts a gateway replica).
*/}}
{{- define "llmserve.podTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $v := $root.Values }}
metadata:
  labels:
    {{- include "llmserve.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- if .gateway }}
    llmserve.io/gateway: "true"
    {{- end }}
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  # Long enough for the gateway's drain (in-flight streams) after SIGTERM.
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" (eq .nodeType "head") }}
      image: {{ include "llmserve.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        # Engines listen on the pod IP (not 0.0.0.0): gateways on other pods reach them there, and
        # they advertise that address (serve/engine/direct.py).
        - name: LLMSERVE_BIND_HOST
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        # Engines answer only callers with this bearer token; Ray workers (engines, gateway
        # replicas, the batch worker) inherit it from the container.
        - name: LLMSERVE_ENGINE_SECRET
          valueFrom:
            secretKeyRef:
              name: {{ include "llmserve.engineSecret" $root }}
              key: {{ $v.engineSecret.key }}
        {{- with (dig "gateway" "adapter_roots" list $v.serve) }}
        # Where a new engine replica may load adapters registered at runtime from.
        - name: LLMSERVE_ADAPTER_ROOTS
          value: {{ join ":" . | quote }}
        {{- end }}
        - name: LLMSERVE_CACHE_DIR
          value: {{ printf "%s/llmserve" $v.modelCache.mountPath | quote }}
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $v.modelCache.mountPath | quote }}
        {{- if $v.hfToken.existingSecret }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $v.hfToken.existingSecret }}
              key: {{ $v.hfToken.key }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        - name: metrics
          containerPort: {{ $v.metrics.rayMetricsPort }}
        {{- if .gateway }}
        - name: serve
          containerPort: {{ include "llmserve.gatewayPort" $root }}
        {{- end }}
      {{- with $g.resources }}
      resources:
        {{- $res := deepCopy . }}
        {{- if $g.gpus }}
        {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $g.gpus) ($res.limits | default dict)) }}
        {{- $_ := set $res "requests" (merge (dict "nvidia.com/gpu" $g.gpus) ($res.requests | default dict)) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      {{- end }}
      {{- if eq .nodeType "worker" }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
        - name: model-cache
          mountPath: {{ $v.modelCache.mountPath }}
        - name: config
          mountPath: /etc/llmserve/config
          readOnly: true
        - name: api-keys
          mountPath: /etc/llmserve/keys
          readOnly: true
  volumes:
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSize | default $v.shmSize }}
    - name: model-cache
      {{- if eq $v.modelCache.type "pvc" }}
      persistentVolumeClaim:
        claimName: {{ $v.modelCache.existingClaim | default (printf "%s-model-cache" (include "llmserve.fullname" $root)) }}
      {{- else if $v.modelCache.sizeLimit }}
      emptyDir:
        sizeLimit: {{ $v.modelCache.sizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: config
      configMap:
        name: {{ include "llmserve.fullname" $root }}-config
    - name: api-keys
      secret:
        secretName: {{ include "llmserve.apiKeysSecret" $root }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
{{- end }}

{{/*
The RayCluster spec of the RayService (component serve) or of the batch RayJob (component batch).
Params: root, component, workerGroups.
*/}}
{{- define "llmserve.rayClusterSpec" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $serve := eq .component "serve" }}
rayVersion: {{ $v.rayVersion | quote }}
enableInTreeAutoscaling: {{ $v.autoscaler.enabled }}
{{- if $v.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with $v.autoscaler.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
    metrics-export-port: {{ $v.metrics.rayMetricsPort | quote }}
    {{- range $k, $val := $v.head.rayStartParams }}
    {{ $k }}: {{ $val | quote }}
    {{- end }}
  {{- if and $serve $v.head.gateway }}
  labels:
    llmserve.io/gateway: "true"
  {{- end }}
  template:
    {{- include "llmserve.podTemplate" (dict "root" $root "group" $v.head "nodeType" "head" "component" .component
          "gateway" (and $serve $v.head.gateway)) | trim | nindent 4 }}
{{- if .workerGroups }}
workerGroupSpecs:
  {{- range .workerGroups }}
  - groupName: {{ .name }}
    replicas: {{ .replicas }}
    minReplicas: {{ .minReplicas }}
    maxReplicas: {{ .maxReplicas }}
    {{- with .idleTimeoutSeconds }}
    idleTimeoutSeconds: {{ . }}
    {{- end }}
    rayStartParams:
      metrics-export-port: {{ $v.metrics.rayMetricsPort | quote }}
      {{- range $k, $val := .rayStartParams }}
      {{ $k }}: {{ $val | quote }}
      {{- end }}
    {{- if and $serve .gateway }}
    labels:
      llmserve.io/gateway: "true"
    {{- end }}
    template:
      {{- include "llmserve.podTemplate" (dict "root" $root "group" . "nodeType" "worker" "component" $.component
            "gateway" (and $serve .gateway)) | trim | nindent 6 }}
  {{- end }}
{{- end }}
{{- end }}
