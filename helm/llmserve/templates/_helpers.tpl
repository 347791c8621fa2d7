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

{{- define "llmserve.redisName" -}}
{{- printf "%s-redis" (include "llmserve.fullname" .) }}
{{- end }}

{{- define "llmserve.redisSecret" -}}
{{- .Values.redis.auth.existingSecret | default (include "llmserve.redisName" .) }}
{{- end }}

{{- define "llmserve.redisSelectorLabels" -}}
{{ include "llmserve.selectorLabels" . }}
app.kubernetes.io/component: redis
{{- end }}

{{/*
`ray start` parameters of a group (params: root, group, nodeType): the chart's defaults under the
group's own rayStartParams (the group's win). dashboard-agent-listen-port is always explicit: the
probes below call the agent's /api/healthz on it. Returned as YAML (fromYaml it).
*/}}
{{- define "llmserve.rayStartParams" -}}
{{- $v := .root.Values }}
{{- $defaults := dict "metrics-export-port" (toString $v.metrics.rayMetricsPort)
      "dashboard-agent-listen-port" "52365" }}
{{- if eq .nodeType "head" }}
{{- $_ := set $defaults "dashboard-host" "0.0.0.0" }}
{{- end }}
{{- $params := dict }}
{{- range $k, $val := (.group.rayStartParams | default dict) }}
{{- $_ := set $params $k (toString $val) }}
{{- end }}
{{- /* Ray resources the autoscaler must know a group has, written the way KubeRay writes a group's
`resources` (pod.go updateRayStartParamsResources: single-quoted JSON). KubeRay's autoscaler builds
its node types from what a group declares (ray/autoscaler/_private/kuberay/autoscaling_config.py)
and, in Ray 2.60's default (v1) autoscaler, ignores label selectors:
- accelerator_type:<X>: Ray Serve LLM puts it on every placement bundle of a model with
  accelerator_type. A real node of that GPU has it (Ray detects it), but without it declared no
  group fits and the model never grows past the pods already running.
- llmserve_gateway: 1 on a pod that hosts a gateway; each gateway replica takes 1, so there is one
  per pod and a pending replica makes the autoscaler add a pod of a gateway group.
  llmserve_gateway_host: 1 there too, for the batch worker (0.001 of it: on a gateway pod, beside
  that pod's gateway).
- customResources: the group's own. */}}
{{- $res := dict }}
{{- range $k, $n := (.group.customResources | default dict) }}{{ $_ := set $res $k $n }}{{ end }}
{{- with .group.acceleratorType }}{{ $_ := set $res (printf "accelerator_type:%s" .) 1 }}{{ end }}
{{- if .group.gateway }}{{ $_ := set $res "llmserve_gateway" 1 }}{{ $_ := set $res "llmserve_gateway_host" 1 }}{{ end }}
{{- if $res }}
{{- if hasKey $params "resources" }}
{{- fail (printf "%s: rayStartParams.resources cannot be combined with what the chart declares (acceleratorType, gateway): put custom resources in customResources" (.group.name | default "head")) }}
{{- end }}
{{- $_ := set $params "resources" (printf "'%s'" (toJson $res)) }}
{{- end }}
{{- toYaml (merge $params $defaults) }}
{{- end }}

{{/* The head's dashboard port (KubeRay submits serveConfigV2 there; the NetworkPolicy opens it). */}}
{{- define "llmserve.dashboardPort" -}}
{{- index (.Values.head.rayStartParams | default dict) "dashboard-port" | default 8265 | int }}
{{- end }}

{{/*
serveConfigV2: one Serve application per model (serve.launch.engine_replica:build) and the gateway
(serve.launch.gateway_replica:build), Serve's own HTTP proxy disabled. route_prefix is null: no app is
reached through a Serve proxy. The gateway's replicas and the batch worker are placed on the pods
labelled llmserve.io/gateway=true (those the Service selects) by the Ray resources only those pods
declare, through Serve deployment overrides.
*/}}
{{- define "llmserve.serveConfigV2" -}}
{{- $ns := dig "ray" "namespace" "llmserve" .Values.serve }}
{{- $apps := list }}
{{- range .Values.serve.models }}
{{- $apps = append $apps (dict "name" .name "import_path" "serve.launch.engine_replica:build" "route_prefix" nil
      "args" (dict "model" . "namespace" $ns "adapter_roots" (dig "gateway" "adapter_roots" (list) $.Values.serve))) }}
{{- end }}
{{- /* Placement by Ray resources that gateway pods declare (llmserve.rayStartParams), not by node
labels: Ray 2.60's default autoscaler ignores label selectors, and Serve runs an application's build
task on the node pool its deployments' label selector names, where the built application (an
object of ~125 KB: the whole configuration) stays pinned, so that pod would never be idle and never
be removed (tests/cluster/test_autoscaling_cluster.py). llmserve_gateway: one gateway per pod, and
what makes the autoscaler add a gateway pod. */}}
{{- $overrides := list (dict "name" "gateway" "ray_actor_options" (dict "num_cpus" 0 "resources" (dict "llmserve_gateway" 1))) }}
{{- if dig "batch" "enabled" true .Values.serve }}
{{- /* The batch worker (one replica, restarted by Serve) runs on a gateway pod too: it reads the
files the gateways store, and the NetworkPolicy treats it as one of the release's Ray pods. Serve
refuses an override for a deployment the app lacks, hence only with batch enabled. */}}
{{- $overrides = append $overrides (dict "name" "batch-worker" "ray_actor_options" (dict "num_cpus" 0 "resources" (dict "llmserve_gateway_host" 0.001))) }}
{{- end }}
{{- $gateway := dict "name" "gateway" "import_path" "serve.launch.gateway_replica:build" "route_prefix" nil
      "args" (dict "config" .Values.serve "replicas" (int .Values.gateway.replicas))
      "deployments" $overrides }}
{{- toYaml (dict "proxy_location" "Disabled" "applications" (append $apps $gateway)) }}
{{- end }}

{{/*
One Ray pod template. Params: root (.), group (head or a worker group's values), nodeType
(head|worker), component (serve|batch), gateway (bool: this pod hosts a gateway replica), params
(the group's rayStartParams, llmserve.rayStartParams).
*/}}
{{- define "llmserve.podTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $v := $root.Values }}
{{- $params := .params }}
{{- $agentPort := index $params "dashboard-agent-listen-port" | int }}
{{- $gatewayProbed := and .gateway (eq .nodeType "worker") }}
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
  {{- if not (and (eq .nodeType "head") $v.autoscaler.enabled) }}
  # Nothing in a Ray pod calls the Kubernetes API, except the head's autoscaler sidecar (KubeRay
  # gives the head a service account it may patch the RayCluster with).
  automountServiceAccountToken: false
  {{- end }}
  # Long enough for the gateway's drain (in-flight streams) after SIGTERM.
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
  {{- if and (eq .nodeType "head") (eq .component "serve") $v.gcsFaultTolerance.enabled $v.redis.enabled }}
  # GCS fault tolerance on the chart's Redis, created at the same time at install: a GCS that
  # cannot reach Redis when it starts exits, and the head container restarts after the kubelet's
  # back-off. The head waits for Redis to answer (through its Service: only once Ready) instead.
  initContainers:
    - name: wait-redis
      image: {{ printf "%s:%s" $v.redis.image.repository (toString $v.redis.image.tag) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      {{- with $v.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      env:
        # redis-cli reads the password here: off the command line.
        - name: REDISCLI_AUTH
          valueFrom:
            secretKeyRef:
              name: {{ include "llmserve.redisSecret" $root }}
              key: redis-password
      command: ["sh", "-c", {{ printf "until redis-cli -h %s -p 6379 ping | grep -q PONG; do echo waiting for redis; sleep 2; done" (include "llmserve.redisName" $root) | quote }}]
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {memory: 64Mi}
  {{- end }}
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
        {{- if $gatewayProbed }}
        # At most how long this pod's kubelet takes from the gateway's first 200 on /health to the
        # pod Ready (a startup probe period, then a readiness one, 2 s for the status to reach the
        # endpoints): the gateway replica holds its Serve application short of RUNNING that long,
        # because KubeRay moves an upgrade's Service on RUNNING alone (serve/gateway/readiness.py).
        - name: LLMSERVE_GATEWAY_READY_HOLD_S
          value: {{ add $v.probes.startup.periodSeconds $v.probes.readiness.periodSeconds 2 | quote }}
        {{- end }}
        {{- if and (eq .nodeType "head") (include "llmserve.gcsFaultTolerance" $root | trim) }}
        # Serve's controller, restarted on a new head after a lost one, replaces every live replica
        # that has not answered its recovery calls within this many seconds (Ray's default: 30).
        # After a lost head the replicas answered 30.5 s after the new controller started, on 2
        # cores (tests/cluster, test_a_lost_head_with_gcs_fault_tolerance): with the default every
        # one was replaced and its model reloaded. The controller runs on the head.
        - name: RAY_SERVE_SLOW_STARTUP_WARNING_S
          value: {{ $v.gcsFaultTolerance.serveRecoveryTimeoutS | quote }}
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
        {{- with (include "llmserve.storeEnv" $root | trim) }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      ports:
        {{- if eq .nodeType "head" }}
        # KubeRay builds the head Service from these named ports: without `dashboard` it cannot
        # find where to submit serveConfigV2 (utils.FetchHeadServiceURL).
        - name: gcs-server
          containerPort: {{ index $params "port" | default 6379 | int }}
        - name: dashboard
          containerPort: {{ index $params "dashboard-port" | default 8265 | int }}
        - name: client
          containerPort: {{ index $params "ray-client-server-port" | default 10001 | int }}
        {{- end }}
        - name: metrics
          containerPort: {{ index $params "metrics-export-port" | int }}
        {{- if or .gateway (and (eq .nodeType "head") (eq .component "serve")) }}
        # KubeRay reads the port named `serve`: on the head it is required for the RayService's
        # <name>-serve-svc (even when the head runs no gateway), on a worker it is what KubeRay's
        # injected readiness probe would call (the chart sets its own probes below).
        - name: serve
          containerPort: {{ include "llmserve.gatewayPort" $root }}
        {{- end }}
      {{- /*
      Explicit probes on every Ray container, so KubeRay injects none: its RayService worker
      readiness probe greps Serve's proxy /-/healthz for "success" on the serve port, which engine
      pods do not listen on and the gateway never answers, so those pods would stay NotReady.
      Liveness is the Ray node (raylet, and GCS on the head) on the dashboard agent. Readiness of a
      worker that hosts a gateway is the gateway's /health (200 once every model kept at >= 1 replica has one),
      so the Service sends clients only to gateways that can route. The head is Ready by its Ray
      node alone, even with head.gateway: KubeRay submits serveConfigV2 only once the head pod is
      Ready (RayServiceReconciler.reconcileServe), so a head gated on the gateway would wait forever.
      */}}
      livenessProbe:
        httpGet:
          path: /api/healthz
          port: {{ $agentPort }}
        {{- toYaml $v.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          {{- if $gatewayProbed }}
          path: /health
          port: {{ include "llmserve.gatewayPort" $root }}
          {{- else }}
          path: /api/healthz
          port: {{ $agentPort }}
          {{- end }}
        {{- toYaml $v.probes.readiness | nindent 8 }}
      {{- if $gatewayProbed }}
      # Holds liveness and readiness off while the models load (image pull, weights, warm-up): the
      # gateway's /health answers 503 until every model kept at >= 1 replica has a ready one.
      startupProbe:
        httpGet:
          path: /health
          port: {{ include "llmserve.gatewayPort" $root }}
        {{- toYaml $v.probes.startup | nindent 8 }}
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
      # First a pause while the pod leaves the Services' endpoints (kube-proxy, ingress controllers
      # and gateways' connection pools follow the endpoint removal asynchronously): new requests
      # still arriving are served; then `ray stop`, which drains the node's replicas.
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "sleep {{ int $v.preStopPauseSeconds }}; ray stop"]
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
      {{- else if eq $v.modelCache.type "ephemeral" }}
      # A ReadWriteOnce volume of this pod's own (created and deleted with it): weights download
      # once per pod, on disk rather than the node's ephemeral storage.
      ephemeral:
        volumeClaimTemplate:
          spec:
            accessModes: [ReadWriteOnce]
            {{- with $v.modelCache.storageClassName }}
            storageClassName: {{ . }}
            {{- end }}
            resources:
              requests:
                storage: {{ $v.modelCache.size }}
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
  {{- if and .gateway $v.gatewayZoneSpread.enabled }}
  # Gateways spread over zones: a zone's loss leaves gateways in the others. ScheduleAnyway by
  # default (a cluster with one zone, or a pool scaled from zero in one zone, still schedules).
  topologySpreadConstraints:
    - maxSkew: 1
      topologyKey: topology.kubernetes.io/zone
      whenUnsatisfiable: {{ $v.gatewayZoneSpread.whenUnsatisfiable }}
      labelSelector:
        matchLabels:
          {{- include "llmserve.gatewaySelectorLabels" $root | nindent 10 }}
      # Only the pods of the same RayCluster: during a NewCluster upgrade the old cluster's
      # gateways must not skew the new one's placement.
      matchLabelKeys: [ray.io/cluster]
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
{{- if $serve }}
{{- with include "llmserve.gcsFaultTolerance" $root | trim }}
# GCS fault tolerance: the GCS keeps its state in Redis, so a lost head comes back with the
# cluster's actors, placement groups and Serve applications, and workers (engines, gateways) keep
# running and reconnect instead of restarting and reloading every model. KubeRay sets
# RAY_REDIS_ADDRESS and the password (from the Secret) in the head's environment; each RayCluster
# of a NewCluster upgrade keeps its own namespace of keys (KubeRay's default, the cluster's UID).
gcsFaultToleranceOptions:
  {{- . | nindent 2 }}
{{- end }}
{{- end }}
{{- if $v.autoscaler.enabled }}
autoscalerOptions:
  upscalingMode: {{ $v.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ $v.autoscaler.idleTimeoutSeconds }}
  {{- with $v.autoscaler.version }}
  version: {{ . }}
  {{- end }}
  imagePullPolicy: {{ $v.image.pullPolicy }}
  {{- with $v.securityContext }}
  # The sidecar KubeRay adds to the head: the Ray containers' restricted context.
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.autoscaler.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- $headParams := include "llmserve.rayStartParams" (dict "root" $root "group" $v.head "nodeType" "head") | fromYaml }}
headGroupSpec:
  rayStartParams:
    {{- range $k, $val := $headParams }}
    {{ $k }}: {{ $val | quote }}
    {{- end }}
  {{- if and $serve $v.head.gateway }}
  labels:
    llmserve.io/gateway: "true"
  {{- end }}
  template:
    {{- include "llmserve.podTemplate" (dict "root" $root "group" $v.head "nodeType" "head" "component" .component
          "gateway" (and $serve $v.head.gateway) "params" $headParams) | trim | nindent 4 }}
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
    {{- $params := include "llmserve.rayStartParams" (dict "root" $root "group" . "nodeType" "worker") | fromYaml }}
    rayStartParams:
      {{- range $k, $val := $params }}
      {{ $k }}: {{ $val | quote }}
      {{- end }}
    {{- if and $serve .gateway }}
    labels:
      llmserve.io/gateway: "true"
    {{- end }}
    template:
      {{- include "llmserve.podTemplate" (dict "root" $root "group" . "nodeType" "worker" "component" $.component
            "gateway" (and $serve .gateway) "params" $params) | trim | nindent 6 }}
  {{- end }}
{{- end }}
{{- end }}

{{/*
Where the serving stores are, as env of every Ray container (gateways, the batch worker and the
engines read them through serve/config.py's LLMSERVE__ overrides). Passwords stay in Secrets: the
RayService (and its serveConfigV2) holds none.
*/}}
{{- define "llmserve.storeEnv" -}}
{{- if .Values.redis.enabled }}
# The in-chart Redis. The password comes first: Kubernetes expands $(VAR) only from variables
# defined earlier in the list.
- name: LLMSERVE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "llmserve.redisSecret" . }}
      key: redis-password
- name: LLMSERVE__CACHE__REDIS_URL
  value: {{ printf "redis://:$(LLMSERVE_REDIS_PASSWORD)@%s:6379/0" (include "llmserve.redisName" .) | quote }}
{{- else if .Values.redis.external.existingSecret }}
- name: LLMSERVE__CACHE__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: url
{{- end }}
{{- with .Values.batchStore.postgresql.existingSecret }}
# The batch store shared by every gateway and the batch worker.
- name: LLMSERVE__BATCH__DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: url
{{- end }}
{{- end }}


{{/* Bytes of a Kubernetes memory quantity in Ki, Mi or Gi (or plain bytes), as a string. */}}
{{- define "llmserve.bytes" -}}
{{- $q := toString . }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 }}
{{- $unit := regexFind "(Ki|Mi|Gi)$" $q }}
{{- $n := trimSuffix $unit $q | int64 }}
{{- if $unit }}{{ mul $n (get $units $unit) }}{{ else }}{{ $n }}{{ end }}
{{- end }}

{{/* gcsFaultToleranceOptions of the serving cluster (YAML, empty when off): the chart's Redis, or
gcsFaultTolerance.external's. */}}
{{- define "llmserve.gcsFaultTolerance" -}}
{{- $ft := .Values.gcsFaultTolerance }}
{{- if $ft.enabled }}
{{- if .Values.redis.enabled }}
redisAddress: {{ printf "%s:6379" (include "llmserve.redisName" .) | quote }}
redisPassword:
  valueFrom:
    secretKeyRef:
      name: {{ include "llmserve.redisSecret" . }}
      key: redis-password
{{- else if $ft.external.address }}
redisAddress: {{ $ft.external.address | quote }}
{{- with $ft.external.passwordSecret }}
redisPassword:
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $ft.external.passwordKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Millicores of a Kubernetes CPU quantity ("8", "500m"), as a string. */}}
{{- define "llmserve.millicpu" -}}
{{- $q := toString . }}
{{- if hasSuffix "m" $q }}{{ trimSuffix "m" $q | int64 }}{{ else }}{{ mul ($q | int64) 1000 }}{{ end }}
{{- end }}
