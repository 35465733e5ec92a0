// assistant-worker on Azure Container Apps: a Log Analytics workspace, a Container Apps
// environment, a user-assigned managed identity with data-plane roles on the storage account
// and the Azure OpenAI account, and the worker app, scaled by KEDA on its three work queues
// (requests, run steps, run deadlines) from zero replicas. No keys anywhere: storage, the scaler, the model and the registry are
// all reached with the managed identity. The worker's own secrets, the keys of its query API
// (WORKER_QUERY_KEYS) and the bearer tokens of MCP servers, if any, are Key Vault references,
// read with that identity.
//
// Optional (webhooks=true): the webhooks of Azure OpenAI's background responses. The app gets
// an external ingress whose one port is the worker's webhook port (WORKER_WEBHOOK_PORT), which
// serves POST /webhooks/openai and nothing else; the probes, /metrics and the query API stay on
// WORKER_HTTP_PORT, reachable only inside the environment. An HTTP scale rule wakes an app
// scaled to zero when a webhook comes, and the signing secrets come from Key Vault.
//
//   az deployment group create -g RESOURCE_GROUP \
//     -f deploy/containerapp.bicep -p deploy/containerapp.parameters.json
//
// See docs/operations.md (deploying, scaling, alerts, runbooks).

targetScope = 'resourceGroup'

@description('Location of every resource this template creates.')
param location string = resourceGroup().location

@description('Name of the container app; the identity, environment and workspace are named after it.')
@minLength(2)
@maxLength(32)
param appName string = 'assistant-worker'

@description('Image to run, e.g. myregistry.azurecr.io/assistant-worker:0.1.0 (az acr build -f deploy/Dockerfile .).')
param image string

@description('Existing Azure Container Registry (this resource group) holding the image, pulled with the managed identity. Empty for a public image.')
param containerRegistryName string = ''

@description('Existing storage account (this resource group) holding the work queues and the ChatState table.')
param storageAccountName string

@description('Existing Azure OpenAI account (Microsoft.CognitiveServices/accounts, this resource group).')
param openAiAccountName string

@description('Default model deployment name (CHAT_MODEL_DEPLOYMENT_NAME).')
param chatModelDeployment string = 'gpt-4o-mini'

@description('Default model API (WORKER_MODEL_API).')
@allowed([
  'chat'
  'responses'
  'assistants'
])
param modelApi string = 'chat'

@description('Queue producers send requests to (WORKER_REQUESTS_QUEUE).')
param requestsQueueName string = 'assistant-requests'

@description('Queue of the worker\'s run-step continuations (WORKER_RUNS_QUEUE).')
param runsQueueName string = 'assistant-runs'

@description('Queue of the worker\'s run deadlines: one watchdog per run, delayed until just after WORKER_RUN_TIMEOUT (WORKER_DEADLINES_QUEUE).')
param deadlinesQueueName string = 'assistant-deadlines'

@description('Messages processed at once per replica (WORKER_CONCURRENCY).')
param concurrency int = 16

@description('Scale target: waiting requests per replica.')
param requestsQueueLength int = 8

@description('Scale target: visible run steps per replica.')
param runsQueueLength int = 8

@description('Scale target: due run deadlines per replica. High on purpose: this rule wakes an idle app when a deadline falls due; the other two size it.')
param deadlinesQueueLength int = 100

@description('Fewest replicas; 0 lets the app scale to zero when no request waits and no run step or deadline is due.')
param minReplicas int = 0

@description('Most replicas.')
param maxReplicas int = 10

@description('Seconds in-flight messages get after SIGTERM (WORKER_SHUTDOWN_GRACE).')
param shutdownGraceSeconds int = 25

@description('Seconds the container gets beyond the drain before it is killed (release of unfinished leases, exit).')
param drainMarginSeconds int = 10

@description('Take the webhooks of background responses (POST /webhooks/openai): an external ingress exposing the webhook port alone, an HTTP scale rule, and WORKER_WEBHOOK_SECRETS from Key Vault. Register the app\'s URL with Azure OpenAI afterwards (docs/operations.md).')
param webhooks bool = false

@description('With webhooks: an existing Key Vault (this resource group, RBAC authorization) holding the signing secrets.')
param webhookKeyVaultName string = ''

@description('With webhooks: the Key Vault secret holding the signing secrets, comma-separated (whsec_..., two while one is rotated out).')
param webhookSecretName string = 'openai-webhook-secrets'

@description('With webhooks: concurrent webhook deliveries per replica before the HTTP rule adds a replica. High on purpose: a replica answers a delivery in milliseconds; the queue rules size the app.')
param webhookConcurrentRequests int = 100

@description('Optional Application Insights connection string; traces go there when set.')
@secure()
param applicationInsightsConnectionString string = ''

@description('Existing Key Vault (this resource group, Azure RBAC permission model) holding the worker\'s secrets: the query API\'s keys and the MCP servers\' bearer tokens. Empty: the query API is off (GET /assistants/{id} answers 404) and no MCP server may need a token.')
param keyVaultName string = ''

@description('Secret of that Key Vault holding WORKER_QUERY_KEYS: comma-separated keys, two during a rotation. Referenced without a version, so a new version reaches the app within 30 minutes (docs/operations.md). Empty: the query API stays off even with a vault (for MCP tokens alone).')
param queryKeysSecretName string = 'worker-query-keys'

@description('MCP servers assistants may use (WORKER_MCP_SERVERS), as objects { name, url, tokenSecretName? }: name as assistants name it in mcpServers, url its Streamable HTTP endpoint, tokenSecretName the Key Vault secret (in keyVaultName) holding its bearer token, if it needs one.')
param mcpServers array = []

@description('Days the workspace keeps logs.')
param logRetentionDays int = 30

@description('Tags put on every resource.')
param tags object = {}

// Built-in role definition ids (the same in every tenant).
var storageQueueDataContributor = '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
var storageTableDataContributor = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var cognitiveServicesOpenAIUser = '5e0bd9bd-7b93-4f28-af87-19fc36ad61bd'
var acrPull = '7f951dda-4ed3-4680-a7ca-43fe172d538d'
var keyVaultSecretsUser = '4633458b-17de-408a-b874-0445c86b69e6'

// /healthz (liveness), /readyz (readiness: 503 while storage is unreachable), /metrics.
var httpPort = 8080
// POST /webhooks/openai alone (WORKER_WEBHOOK_PORT): the only port the ingress exposes.
var webhookPort = 8081
var terminationGracePeriodSeconds = shutdownGraceSeconds + drainMarginSeconds

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' existing = {
  name: storageAccountName
}

resource openAi 'Microsoft.CognitiveServices/accounts@2024-10-01' existing = {
  name: openAiAccountName
}

resource registry 'Microsoft.ContainerRegistry/registries@2023-07-01' existing = if (!empty(containerRegistryName)) {
  name: containerRegistryName
}

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' existing = if (!empty(keyVaultName)) {
  name: keyVaultName
}

resource queryKeysSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' existing = if (queryKeysOn) {
  parent: vault
  name: queryKeysSecretName
}

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: '${appName}-id'
  location: location
  tags: tags
}

resource queueDataRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, storageQueueDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageQueueDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource tableDataRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, identity.id, storageTableDataContributor)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributor)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource openAiUserRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(openAi.id, identity.id, cognitiveServicesOpenAIUser)
  scope: openAi
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', cognitiveServicesOpenAIUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource acrPullRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(containerRegistryName)) {
  name: guid(resourceGroup().id, containerRegistryName, identity.id, acrPull)
  scope: registry
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', acrPull)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The query API's keys: the identity reads this one secret, not the whole vault.
resource queryKeysRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (queryKeysOn) {
  name: guid(resourceGroup().id, keyVaultName, queryKeysSecretName, identity.id, keyVaultSecretsUser)
  scope: queryKeysSecret
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The MCP servers' tokens: read by the app's identity from the vault (RBAC vault), nowhere else.
resource vaultSecretsRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(keyVaultName) && !empty(mcpServersWithToken)) {
  name: guid(resourceGroup().id, keyVaultName, identity.id, keyVaultSecretsUser)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' existing = if (webhooks) {
  name: webhookKeyVaultName
}

resource webhookSecretRole 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (webhooks) {
  name: guid(resourceGroup().id, webhookKeyVaultName, identity.id, keyVaultSecretsUser)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUser)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: '${appName}-logs'
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

// Logs reach the workspace through a diagnostic setting ('azure-monitor'), so the template
// never reads the workspace's shared key.
resource environment 'Microsoft.App/managedEnvironments@2025-01-01' = {
  name: '${appName}-env'
  location: location
  tags: tags
  properties: {
    appLogsConfiguration: {
      destination: 'azure-monitor'
    }
    workloadProfiles: [
      {
        name: 'Consumption'
        workloadProfileType: 'Consumption'
      }
    ]
  }
}

resource environmentLogs 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'to-log-analytics'
  scope: environment
  properties: {
    workspaceId: workspace.id
    // Resource-specific tables (ContainerAppConsoleLogs, ContainerAppSystemLogs).
    logAnalyticsDestinationType: 'Dedicated'
    logs: [
      {
        categoryGroup: 'allLogs'
        enabled: true
      }
    ]
    metrics: [
      {
        category: 'AllMetrics'
        enabled: true
      }
    ]
  }
}

var baseEnv = [
  // Identity-based storage: the worker uses DefaultAzureCredential, which picks the
  // user-assigned identity named by AZURE_CLIENT_ID. __clientId is the Functions host's name
  // for the same thing, kept so that app settings carry over both ways.
  {
    name: 'AzureWebJobsStorage__accountName'
    value: storageAccountName
  }
  {
    name: 'AzureWebJobsStorage__clientId'
    value: identity.properties.clientId
  }
  {
    name: 'AZURE_CLIENT_ID'
    value: identity.properties.clientId
  }
  {
    name: 'AZURE_OPENAI_ENDPOINT'
    value: openAi.properties.endpoint
  }
  {
    name: 'CHAT_MODEL_DEPLOYMENT_NAME'
    value: chatModelDeployment
  }
  {
    name: 'WORKER_MODEL_API'
    value: modelApi
  }
  {
    name: 'WORKER_REQUESTS_QUEUE'
    value: requestsQueueName
  }
  {
    name: 'WORKER_RUNS_QUEUE'
    value: runsQueueName
  }
  {
    name: 'WORKER_DEADLINES_QUEUE'
    value: deadlinesQueueName
  }
  {
    name: 'WORKER_CONCURRENCY'
    value: string(concurrency)
  }
  {
    name: 'WORKER_SHUTDOWN_GRACE'
    value: string(shutdownGraceSeconds)
  }
  {
    name: 'WORKER_HTTP_PORT'
    value: string(httpPort)
  }
  {
    name: 'WORKER_LOG_FORMAT'
    value: 'json'
  }
  {
    name: 'OTEL_SERVICE_NAME'
    value: appName
  }
]

var appInsightsEnv = empty(applicationInsightsConnectionString) ? [] : [
  {
    name: 'APPLICATIONINSIGHTS_CONNECTION_STRING'
    // checkov:skip=CKV_SECRET_6:the name of a secret of the app, not a secret
    secretRef: 'appinsights-connection-string'
  }
]

// The query API's keys: a Key Vault reference without a version (the latest one is used),
// read with the app's identity; the value never appears in the template or its deployments.
// The query API is served when its keys have a vault and a secret.
var queryKeysOn = !empty(keyVaultName) && !empty(queryKeysSecretName)

var queryKeysSecrets = queryKeysOn ? [
  {
    name: 'query-keys'
    keyVaultUrl: 'https://${keyVaultName}${environment().suffixes.keyvaultDns}/secrets/${queryKeysSecretName}'
    identity: identity.id
  }
] : []

var queryKeysEnv = queryKeysOn ? [
  {
    name: 'WORKER_QUERY_KEYS'
    secretRef: 'query-keys'
  }
] : []

var appInsightsSecrets = empty(applicationInsightsConnectionString) ? [] : [
  {
    name: 'appinsights-connection-string'
    value: applicationInsightsConnectionString
  }
]

// MCP servers (SPEC §5.5): WORKER_MCP_SERVERS names them; each name N has N__url and, when the
// server needs a token, N__token from a Container Apps secret that is a Key Vault reference
// (resolved by the platform with the app's identity: the token is never in this template, its
// parameters or the revision). Secret names allow only lower-case letters, digits and '-'.
var mcpServersWithToken = filter(mcpServers, server => !empty(server.?tokenSecretName ?? ''))

var mcpEnv = empty(mcpServers) ? [] : concat(
  [
    {
      name: 'WORKER_MCP_SERVERS'
      value: join(map(mcpServers, server => server.name), ',')
    }
  ],
  map(mcpServers, server => {
    name: '${server.name}__url'
    value: server.url
  }),
  map(mcpServersWithToken, server => {
    name: '${server.name}__token'
    secretRef: 'mcp-token-${toLower(replace(server.name, '_', '-'))}'
  })
)

var mcpSecrets = map(mcpServersWithToken, server => {
  name: 'mcp-token-${toLower(replace(server.name, '_', '-'))}'
  keyVaultUrl: 'https://${keyVaultName}${az.environment().suffixes.keyvaultDns}/secrets/${server.tokenSecretName}'
  identity: identity.id
})

// The webhook port and the signing secrets (a Key Vault reference, read with the identity).
var webhookEnv = webhooks ? [
  {
    name: 'WORKER_WEBHOOK_PORT'
    value: string(webhookPort)
  }
  {
    name: 'WORKER_WEBHOOK_SECRETS'
    // checkov:skip=CKV_SECRET_6:the name of a secret of the app, not a secret
    secretRef: 'webhook-secrets'
  }
] : []

var webhookSecrets = webhooks ? [
  {
    name: 'webhook-secrets'
    // Versionless: a new version (a rotation) reaches the app within 30 minutes, or at once
    // with a new revision.
    keyVaultUrl: 'https://${webhookKeyVaultName}${environment().suffixes.keyvaultDns}/secrets/${webhookSecretName}'
    identity: identity.id
  }
] : []

// Container Apps ingress cannot filter paths: it exposes one port, the webhook's, which serves
// nothing but POST /webhooks/openai. WORKER_HTTP_PORT (probes, /metrics, the query API) is an
// internal port mapping: reachable from the environment only, never from outside.
var webhookIngress = {
  external: true
  targetPort: webhookPort
  transport: 'http'
  allowInsecure: false
  additionalPortMappings: [
    {
      external: false
      targetPort: httpPort
    }
  ]
}

// A webhook must wake an app scaled to zero: with minReplicas 0 nobody else would answer it.
var webhookScaleRules = webhooks ? [
  {
    name: 'webhooks-http'
    http: {
      metadata: {
        concurrentRequests: string(webhookConcurrentRequests)
      }
    }
  }
] : []

var registries = empty(containerRegistryName) ? [] : [
  {
    server: '${containerRegistryName}.azurecr.io'
    identity: identity.id
  }
]

// One scale rule per work queue.
var queueScaleRules = [
  {
    // Requests: every message counts, waiting or being handled.
    name: 'requests-queue'
    azureQueue: {
      accountName: storageAccountName
      queueName: requestsQueueName
      queueLength: requestsQueueLength
      identity: identity.id
    }
  }
  {
    // Run steps: only visible ones count, so the delayed polls of a pending background
    // run do not keep replicas awake. KEDA counts with Peek (at most 32 messages) and
    // falls back to counting all messages at 32 or more.
    name: 'runs-queue'
    custom: {
      type: 'azure-queue'
      metadata: {
        accountName: storageAccountName
        queueName: runsQueueName
        queueLength: string(runsQueueLength)
        queueLengthStrategy: 'visibleonly'
      }
      identity: identity.id
    }
  }
  {
    // Run deadlines: every run that starts puts one here, delayed until just after
    // WORKER_RUN_TIMEOUT. Only visible (due) ones count: an idle app at zero replicas
    // wakes when a deadline falls due, and the delayed ones of runs that started (one
    // per run for WORKER_RUN_TIMEOUT) do not keep replicas awake. The same Peek limit
    // applies: at 32 or more due, KEDA counts the delayed ones too, hence the high target.
    name: 'deadlines-queue'
    custom: {
      type: 'azure-queue'
      metadata: {
        accountName: storageAccountName
        queueName: deadlinesQueueName
        queueLength: string(deadlinesQueueLength)
        queueLengthStrategy: 'visibleonly'
      }
      identity: identity.id
    }
  }
]

resource app 'Microsoft.App/containerApps@2025-01-01' = {
  name: appName
  location: location
  tags: tags
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  // The first replica should find its roles in place (they may still take minutes to apply:
  // until then storage answers 403 and the worker retries).
  dependsOn: [
    queueDataRole
    tableDataRole
    openAiUserRole
    acrPullRole
    queryKeysRole
    vaultSecretsRole
    webhookSecretRole
  ]
  properties: {
    environmentId: environment.id
    workloadProfileName: 'Consumption'
    configuration: {
      // A queue worker takes no HTTP traffic: no ingress, unless it takes webhooks (the webhook
      // port alone). The probes reach the container directly.
      activeRevisionsMode: 'Single'
      registries: registries
      secrets: concat(appInsightsSecrets, queryKeysSecrets, mcpSecrets, webhookSecrets)
      ingress: webhooks ? webhookIngress : null
    }
    template: {
      // WORKER_SHUTDOWN_GRACE for in-flight messages, plus a margin to release the rest.
      terminationGracePeriodSeconds: terminationGracePeriodSeconds
      containers: [
        {
          name: 'worker'
          image: image
          resources: {
            cpu: json('0.5')
            memory: '1Gi'
          }
          env: concat(baseEnv, appInsightsEnv, queryKeysEnv, mcpEnv, webhookEnv)
          probes: [
            {
              type: 'Liveness'
              httpGet: {
                path: '/healthz'
                port: httpPort
              }
              initialDelaySeconds: 10
              periodSeconds: 15
              timeoutSeconds: 5
              failureThreshold: 3
            }
            {
              type: 'Readiness'
              httpGet: {
                path: '/readyz'
                port: httpPort
              }
              initialDelaySeconds: 5
              periodSeconds: 10
              timeoutSeconds: 5
              failureThreshold: 3
            }
          ]
        }
      ]
      scale: {
        minReplicas: minReplicas
        maxReplicas: maxReplicas
        pollingInterval: 30
        cooldownPeriod: 300
        rules: concat(queueScaleRules, webhookScaleRules)
      }
    }
  }
}

output appName string = app.name
output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
output environmentName string = environment.name
output webhookUrl string = webhooks ? 'https://${app.properties.configuration.ingress.fqdn}/webhooks/openai' : ''
output workspaceName string = workspace.name
