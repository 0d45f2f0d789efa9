{{- define "paddler.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "paddler.labels" -}}
app.kubernetes.io/name: paddler-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: paddler
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end -}}

{{- define "paddler.selectorLabels" -}}
app.kubernetes.io/name: paddler-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Operator pods: operator.replicas with leader election, else 1. */}}
{{- define "paddler.operatorReplicas" -}}
{{- if .Values.operator.leaderElection.enabled -}}
{{- .Values.operator.replicas -}}
{{- else -}}
1
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag}: the tag defaults to appVersion, and
imageRegistry replaces the registry host (the first path component), as the operator's
--image-registry does for its built-in images. Call with (list $ .Values.images.agent). */}}
{{- define "paddler.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- $repository := $image.repository -}}
{{- with $root.Values.imageRegistry -}}
{{- $parts := splitn "/" 2 $repository -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) (ternary $parts._1 $parts._0 (contains "/" $repository)) -}}
{{- end -}}
{{- printf "%s:%s" $repository ($image.tag | default $root.Chart.AppVersion) -}}
{{- end -}}

{{/* The Secret holding the key of the pools' management tokens. */}}
{{- define "paddler.tokenKeySecret" -}}
{{- .Values.tokenKey.existingSecret | default (printf "%s-token-key" (include "paddler.fullname" .)) -}}
{{- end -}}

{{- define "paddler.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "paddler.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions: least privilege for what it reads and writes. */}}
{{- define "paddler.rules" -}}
- apiGroups: [paddler.dev]
  resources: [llmpools, modeldeployments]
  verbs: [get, list, watch]
- apiGroups: [paddler.dev]
  resources: [llmpools/status, modeldeployments/status]
  verbs: [get, patch]
# blockOwnerDeletion on owner references needs update on the owner's finalizers.
- apiGroups: [paddler.dev]
  resources: [llmpools/finalizers, modeldeployments/finalizers]
  verbs: [update]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch]
# A pool with 2+ balancer replicas gets a disruption budget; it goes when the pool shrinks.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, create, patch, delete]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
- apiGroups: [keda.sh]
  resources: [scaledobjects, triggerauthentications]
  verbs: [get, create, patch, delete]
# Each pool's management token: the operator derives it from the chart's key (mounted
# from the token-key Secret, not read through the API) and creates the pool's Secret once.
# create only: it cannot read, list or watch any Secret (rbac.readableSecrets grants get
# on named ones). create cannot be limited by name in RBAC; it reveals nothing.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
# A pool's PodMonitor and NetworkPolicy, by name (server-side apply, no list or watch):
# granted whatever monitoring.podMonitors and networkPolicy.enabled say, because turned off
# the operator deletes the ones its pools have.
- apiGroups: [monitoring.coreos.com]
  resources: [podmonitors]
  verbs: [get, create, patch, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
{{- end -}}


{{/* kopf itself watches CRDs (to notice ours appear) and namespaces, at cluster scope, read-only. */}}
{{- define "paddler.frameworkRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end -}}
