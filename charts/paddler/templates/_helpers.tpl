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
# Each pool's management token: the operator creates its Secret once and reads it to call
# the balancer. get by name and create only: it cannot list or watch other Secrets.
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
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
