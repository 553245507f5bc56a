{{/* Names and labels shared by every template. */}}

{{- define "infermesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The resource-name prefix: the release name when it already contains the chart name (release
"infermesh" gives "infermesh"), else <release>-<chart>. Cut to 43 characters: the bundled
Postgres StatefulSet is <fullname>-postgres, and a StatefulSet name must stay within 52 (its
pods' controller-revision-hash label adds 11 to the 63-character label limit).
*/}}
{{- define "infermesh.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 43 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 43 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 43 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "infermesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The image tag of the operator and the agents. */}}
{{- define "infermesh.tag" -}}
{{- .Values.image.tag | default .Chart.AppVersion -}}
{{- end -}}

{{/* Labels every object carries; the first two are Helm's own and are stripped in k8s/base. */}}
{{- define "infermesh.labels" -}}
helm.sh/chart: {{ include "infermesh.chart" . }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ include "infermesh.tag" . | quote }}
app.kubernetes.io/part-of: infermesh
{{- end -}}

{{/* The operator's selector labels (never change them: Deployment selectors are immutable). */}}
{{- define "infermesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "infermesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "infermesh.operatorLabels" -}}
{{ include "infermesh.labels" . }}
{{ include "infermesh.selectorLabels" . }}
{{- end -}}

{{/* The bundled Postgres's selector labels. */}}
{{- define "infermesh.postgresSelectorLabels" -}}
app.kubernetes.io/name: {{ include "infermesh.name" . }}-postgres
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: database
{{- end -}}

{{- define "infermesh.postgresLabels" -}}
{{ include "infermesh.labels" . }}
{{ include "infermesh.postgresSelectorLabels" . }}
{{- end -}}

{{/* Labels of objects that belong to neither pod set (RBAC, the Mesh, monitors). */}}
{{- define "infermesh.commonLabels" -}}
{{ include "infermesh.labels" . }}
app.kubernetes.io/name: {{ include "infermesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The agents' pod labels, set by the operator on every agent DaemonSet. */}}
{{- define "infermesh.agentSelectorLabels" -}}
app.kubernetes.io/name: infermesh-agent
{{- end -}}

{{- define "infermesh.databaseSecretName" -}}
{{- if .Values.database.existingSecret -}}
{{- .Values.database.existingSecret -}}
{{- else -}}
{{- include "infermesh.fullname" . }}-database
{{- end -}}
{{- end -}}

{{- define "infermesh.tlsSecretName" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "infermesh.fullname" .)) -}}
{{- end -}}

{{/*
Exactly one database. values.schema.json says so too; this message is the one a user sees when
installing with --skip-schema-validation or from a chart copy without the schema.
*/}}
{{- define "infermesh.validateDatabase" -}}
{{- if and .Values.postgres.enabled .Values.database.existingSecret -}}
{{- fail "infermesh: set either database.existingSecret (your own Postgres) or postgres.enabled=true (the bundled one), not both" -}}
{{- end -}}
{{- if not (or .Values.postgres.enabled .Values.database.existingSecret) -}}
{{- fail "infermesh: no database: set database.existingSecret to a Secret with key DATABASE_URL, or postgres.enabled=true for the bundled Postgres" -}}
{{- end -}}
{{- end -}}

{{/* The restricted-PodSecurity container securityContext, for uid $.uid. */}}
{{- define "infermesh.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "infermesh.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .uid }}
runAsGroup: {{ .uid }}
fsGroup: {{ .uid }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/*
Rules of files/rbac.yaml as YAML, with each resourceNames placeholder ({tlsSecret}) replaced by
the install's name. Takes (dict "rules" <list> "names" <dict placeholder -> name>); an unknown
placeholder fails the render.
*/}}
{{- define "infermesh.resolvedRules" -}}
{{- $names := .names -}}
{{- $out := list -}}
{{- range .rules -}}
{{- $rule := deepCopy . -}}
{{- if hasKey $rule "resourceNames" -}}
{{- $resolved := list -}}
{{- range $rule.resourceNames -}}
{{- if hasPrefix "{" . -}}
{{- if not (hasKey $names .) }}{{ fail (printf "files/rbac.yaml: no name for the placeholder %s" .) }}{{ end -}}
{{- $resolved = append $resolved (get $names .) -}}
{{- else -}}
{{- $resolved = append $resolved . -}}
{{- end -}}
{{- end -}}
{{- $_ := set $rule "resourceNames" $resolved -}}
{{- end -}}
{{- $out = append $out $rule -}}
{{- end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
The egress rule to the object store (s3://, and http(s):// models and inputs), shared by the
operator's and the agents' NetworkPolicies: networkPolicy.objectStore's CIDRs (less `except`)
and extra peers, on its ports. Nothing when there is no peer: an egress rule without `to`
would allow every destination.
*/}}
{{- define "infermesh.objectStoreEgress" -}}
{{- $os := .Values.networkPolicy.objectStore -}}
{{- if or $os.cidrs $os.extraTo -}}
- to:
    {{- range $os.cidrs }}
    - ipBlock:
        cidr: {{ . }}
        {{- with $os.except }}
        except:
          {{- toYaml . | nindent 10 }}
        {{- end }}
    {{- end }}
    {{- with $os.extraTo }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    {{- range $os.ports }}
    - port: {{ int . }}
      protocol: TCP
    {{- end }}
{{- end }}
{{- end -}}
