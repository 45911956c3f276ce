-- Argo CD health check for mcpfly.dev/MCPDeployment.
--
-- Install (argocd-cm ConfigMap):
--   data:
--     resource.customizations.health.mcpfly.dev_MCPDeployment: |
--       <this file>
--
-- Runs with only what Argo CD opens for custom health scripts (Lua's base and table libraries). Argo CD itself
-- answers Progressing for an object being deleted, before running this. The mapping follows kstatus, which the
-- controller writes (see docs/health.md; tests/status_health.rs checks it on every object version):
--   spec.suspend                                   -> Suspended
--   status.observedGeneration < metadata.generation -> Progressing (not picked up yet: -1 is the CRD's default)
--   Stalled=True                                   -> Degraded    (needs a change to the spec or a referenced object)
--   Ready=True                                     -> Healthy
--   Reconciling=True (also a retried Fly failure or handshake failure), Ready=False or no status yet
--                                                  -> Progressing, with the condition's reason and message
local hs = {}

if obj.spec ~= nil and obj.spec.suspend == true then
  hs.status = "Suspended"
  hs.message = "spec.suspend is true: mcpfly leaves the Fly app as it is"
  return hs
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the mcpfly controller to pick up the resource"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and (observed == nil or observed < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the mcpfly controller to observe generation " .. tostring(generation)
  return hs
end

local conditions = {}
if obj.status.conditions ~= nil then
  for _, c in ipairs(obj.status.conditions) do
    conditions[c.type] = c
  end
end

local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local stalled = conditions["Stalled"]
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

local ready = conditions["Ready"]
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = obj.status.url or describe(ready)
  return hs
end

local reconciling = conditions["Reconciling"]
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the Ready condition"
end
return hs
