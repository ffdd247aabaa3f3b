{{/*
Names, labels and the pieces every template shares.

Most helpers take a "variant context": a dict with
  root    the chart's top-level context ($)
  v       the effective values (.Values, or .Values with canary overrides applied)
  variant "stable" or "canary"
  name    the RayService name
built by "fc.variants".
*/}}

{{- define "fc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fc.fullname" -}}
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

{{- define "fc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "fc.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fc.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fashionchameleon
{{- end -}}

{{- define "fc.serviceAccountName" -}}
{{- if .Values.rayCluster.serviceAccount.create -}}
{{- default (include "fc.fullname" .) .Values.rayCluster.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.rayCluster.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "fc.grpcServiceName" -}}
{{- default (printf "%s-grpc" (include "fc.fullname" .)) .Values.grpcService.name -}}
{{- end -}}

{{- define "fc.redisName" -}}{{ include "fc.fullname" . }}-redis{{- end -}}
{{- define "fc.objectStoreName" -}}{{ include "fc.fullname" . }}-s3{{- end -}}
{{- define "fc.cacheDir" -}}/var/cache/fashionchameleon/checkpoints{{- end -}}

{{/* The stable variant, and the canary when enabled: a list of variant contexts. */}}
{{- define "fc.variants" -}}
{{- $root := . -}}
{{- $out := list (dict "variant" "stable" "name" (include "fc.fullname" $root) "v" $root.Values) -}}
{{- if $root.Values.canary.enabled -}}
{{- $v := deepCopy $root.Values -}}
{{- $c := $root.Values.canary -}}
{{- if $c.checkpoint.id -}}{{- $_ := set $v.checkpoint "id" $c.checkpoint.id -}}{{- end -}}
{{- if $c.image.tag -}}{{- $_ := set $v.image "tag" $c.image.tag -}}{{- end -}}
{{- range $name, $override := $c.deployments -}}
{{- if not (hasKey $v.serve.deployments $name) -}}
{{- fail (printf "canary.deployments.%s: no such deployment (have %s)" $name (keys $v.serve.deployments | sortAlpha | join ", ")) -}}
{{- end -}}
{{- $_ := mergeOverwrite (index $v.serve.deployments $name) $override -}}
{{- end -}}
{{- $groups := list -}}
{{- range $g := $v.rayCluster.workerGroups -}}
{{- $groups = append $groups (mergeOverwrite (deepCopy $g) (default dict (index $c.workerGroups $g.name))) -}}
{{- end -}}
{{- $_ := set $v.rayCluster "workerGroups" $groups -}}
{{- $out = append $out (dict "variant" "canary" "name" (printf "%s-canary" (include "fc.fullname" $root)) "v" $v) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{- define "fc.image" -}}
{{- $v := .v -}}
{{- printf "%s:%s" $v.image.repository (default .root.Chart.AppVersion $v.image.tag) -}}
{{- end -}}

{{/*
Cross-field checks that JSON Schema cannot express; each fails with the value path.
*/}}
{{- define "fc.validate" -}}
{{- $v := .Values -}}
{{- $gpuGroups := 0 -}}
{{- $names := dict -}}
{{- range $i, $g := $v.rayCluster.workerGroups -}}
{{- if hasKey $names $g.name -}}{{- fail (printf "rayCluster.workerGroups[%d].name: %q is used twice" $i $g.name) -}}{{- end -}}
{{- $_ := set $names $g.name true -}}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) -}}
{{- fail (printf "rayCluster.workerGroups[%d] (%s): minReplicas %v > maxReplicas %v" $i $g.name $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "rayCluster.workerGroups[%d] (%s): replicas %v outside [minReplicas %v, maxReplicas %v]" $i $g.name $g.replicas $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- if gt (int $g.gpus) 0 -}}{{- $gpuGroups = add1 $gpuGroups -}}{{- end -}}
{{- end -}}
{{- range $name, $d := $v.serve.deployments -}}
{{- if and (gt (float64 $d.numGpus) 0.0) (eq $gpuGroups 0) -}}
{{- fail (printf "serve.deployments.%s.numGpus is %v but no rayCluster.workerGroups entry has gpus > 0: add a type: gpu group or set numGpus: 0" $name $d.numGpus) -}}
{{- end -}}
{{- if gt (int $d.autoscaling.minReplicas) (int $d.autoscaling.maxReplicas) -}}
{{- fail (printf "serve.deployments.%s.autoscaling: minReplicas %v > maxReplicas %v" $name $d.autoscaling.minReplicas $d.autoscaling.maxReplicas) -}}
{{- end -}}
{{- end -}}
{{- $longest := 0.0 -}}
{{- range $name, $d := $v.serve.deployments -}}
{{- if gt (float64 $d.gracefulShutdownTimeoutS) $longest -}}{{- $longest = float64 $d.gracefulShutdownTimeoutS -}}{{- end -}}
{{- end -}}
{{- range $i, $g := $v.rayCluster.workerGroups -}}
{{- $grace := int (default 660 $g.terminationGracePeriodSeconds) -}}
{{- /* GPU groups host the model deployments; CPU groups may host only the gateway. */ -}}
{{- if and (eq $g.type "gpu") (lt (float64 (sub $grace 60)) $longest) -}}
{{- fail (printf "rayCluster.workerGroups[%d] (%s): terminationGracePeriodSeconds %d leaves %ds to drain, less than the longest serve.deployments.*.gracefulShutdownTimeoutS (%v); set it to at least %v" $i $g.name $grace (sub $grace 60) $longest (add (int $longest) 60)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.canary.enabled (not (or $v.ingress.enabled $v.gateway.enabled)) -}}
{{- fail "canary.enabled needs ingress.enabled or gateway.enabled: the weighted split happens there" -}}
{{- end -}}
{{- if and $v.objectStore.bundled.enabled (not $v.objectStore.credentialsSecret.name) -}}
{{- fail "objectStore.bundled.enabled: keep objectStore.credentialsSecret.name set (the chart generates that Secret)" -}}
{{- end -}}
{{- end -}}

{{/* The Redis URL environment variable (FASHIONCHAMELEON_REDIS_URL). */}}
{{- define "fc.redisEnv" -}}
{{- $root := .root -}}
{{- $v := .v -}}
- name: FASHIONCHAMELEON_REDIS_URL
{{- if $v.redis.bundled.enabled }}
  valueFrom:
    secretKeyRef:
      name: {{ include "fc.redisName" $root }}
      key: url
{{- else if $v.redis.url }}
  value: {{ $v.redis.url | quote }}
{{- else }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.redis.urlSecret.name }}
      key: {{ $v.redis.urlSecret.key }}
{{- end }}
{{- end -}}

{{/* S3 credential environment variables (read by services.serve_entry.config_from_env). */}}
{{- define "fc.s3Env" -}}
{{- $root := .root -}}
{{- $s := .v.objectStore -}}
{{- if $s.credentialsSecret.name }}
{{- $secret := ternary (include "fc.objectStoreName" $root) $s.credentialsSecret.name $s.bundled.enabled -}}
- name: FASHIONCHAMELEON_S3_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary "access-key" $s.credentialsSecret.accessKeyKey $s.bundled.enabled }}
- name: FASHIONCHAMELEON_S3_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ ternary "secret-key" $s.credentialsSecret.secretKeyKey $s.bundled.enabled }}
{{- end }}
{{- end -}}

{{/*
FASHIONCHAMELEON_CONFIG: the non-secret AppConfig as JSON. Derived from the serve, checkpoint
and objectStore values, then appConfig deep-merged over it.
*/}}
{{- define "fc.appConfig" -}}
{{- $root := .root -}}
{{- $v := .v -}}
{{- $serve := dict "app_name" $v.serve.appName "grpc_port" (int $v.serve.grpcPort) "http_port" (int $v.serve.httpPort) -}}
{{- /* Only the deployments shared.config.ServeConfig has fields for. */ -}}
{{- range $name := list "encoder" "decoder" "generator" "studio" -}}
{{- $d := index $v.serve.deployments $name -}}
{{- $replicas := ternary $d.autoscaling.minReplicas $d.replicas $d.autoscaling.enabled -}}
{{- if not (kindIs "invalid" $replicas) -}}
{{- $_ := set $serve (printf "%s_replicas" $name) (int $replicas) -}}
{{- end -}}
{{- if ne $name "studio" -}}
{{- $_ := set $serve (printf "%s_gpus" $name) (float64 $d.numGpus) -}}
{{- end -}}
{{- end -}}
{{- $s := $v.objectStore -}}
{{- $endpoint := $s.endpoint -}}
{{- $secure := $s.secure -}}
{{- if $s.bundled.enabled -}}
{{- $endpoint = printf "%s:8333" (include "fc.objectStoreName" $root) -}}
{{- $secure = false -}}
{{- end -}}
{{- $s3 := dict "endpoint" $endpoint "secure" $secure "region" $s.region "bucket" $s.bucket "prefix" $s.prefix "conditional_put" $s.conditionalPut -}}
{{- if $s.publicUrl -}}{{- $_ := set $s3 "public_url" $s.publicUrl -}}{{- end -}}
{{- $model := dict -}}
{{- if $v.checkpoint.id -}}
{{- $_ := set $model "checkpoint" (printf "%s/%s" (include "fc.cacheDir" .) $v.checkpoint.id) -}}
{{- end -}}
{{- $base := dict "serve" $serve "storage" (dict "backend" "s3" "s3" $s3) "model" $model -}}
{{- $cfg := mergeOverwrite (deepCopy $v.appConfig) $base -}}
{{- toJson $cfg -}}
{{- end -}}

{{/*
serveConfigV2 (Ray Serve's ServeDeploySchema) as YAML. One deployment entry per
serve.deployments key; the chart test checks they are exactly services.app.DEPLOYMENTS.
*/}}
{{- define "fc.serveConfig" -}}
{{- $v := .v -}}
{{- $deployments := list -}}
{{- range $name, $d := $v.serve.deployments -}}
{{- $actor := dict "num_cpus" (float64 $d.numCpus) "num_gpus" (float64 $d.numGpus) -}}
{{- if $d.resources -}}{{- $_ := set $actor "resources" $d.resources -}}{{- end -}}
{{- $dep := dict "name" $name "max_ongoing_requests" (int $d.maxOngoingRequests) "graceful_shutdown_timeout_s" (float64 $d.gracefulShutdownTimeoutS) "graceful_shutdown_wait_loop_s" (float64 $d.gracefulShutdownWaitLoopS) "health_check_period_s" (float64 $d.healthCheckPeriodS) "health_check_timeout_s" (float64 $d.healthCheckTimeoutS) "ray_actor_options" $actor -}}
{{- if $d.autoscaling.enabled -}}
{{- $a := $d.autoscaling -}}
{{- $_ := set $dep "num_replicas" "auto" -}}
{{- $auto := dict "min_replicas" (int $a.minReplicas) "max_replicas" (int $a.maxReplicas) "upscale_delay_s" (float64 $a.upscaleDelayS) "downscale_delay_s" (float64 $a.downscaleDelayS) -}}
{{- if eq $name "generator" -}}
{{- /* Sessions are loops, not requests: scale on real-time capacity (services/generator/scaling.py). */ -}}
{{- $_ := set $auto "policy" (dict "policy_function" "services.generator.scaling:RealtimeCapacityPolicy" "policy_kwargs" (dict "target_utilisation" (float64 $a.targetUtilisation))) -}}
{{- else -}}
{{- $_ := set $auto "target_ongoing_requests" (float64 $a.targetOngoingRequests) -}}
{{- end -}}
{{- $_ := set $dep "autoscaling_config" $auto -}}
{{- else if not (kindIs "invalid" $d.replicas) -}}
{{- $_ := set $dep "num_replicas" (int $d.replicas) -}}
{{- end -}}
{{- $deployments = append $deployments $dep -}}
{{- end -}}
{{- $grpc := dict "port" (int $v.serve.grpcPort) "grpc_servicer_functions" (list "services.studio.wire.add_StudioServicer_to_server" "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server") "enable_reflection" true -}}
{{- if $v.serve.grpcRequestTimeoutS -}}{{- $_ := set $grpc "request_timeout_s" (float64 $v.serve.grpcRequestTimeoutS) -}}{{- end -}}
{{- $app := dict "name" $v.serve.appName "route_prefix" "/" "import_path" "services.serve_entry:app" "deployments" $deployments -}}
{{- $cfg := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" (int $v.serve.httpPort)) "grpc_options" $grpc "logging_config" (dict "encoding" "JSON" "log_level" "INFO") "applications" (list $app) -}}
{{- toYaml $cfg -}}
{{- end -}}
