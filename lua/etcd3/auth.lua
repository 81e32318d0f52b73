--- Authentication of a client: signing in with user and password, and
-- signing in again when etcd refuses a token.
--
-- The password is handed to the C module once and kept there only (the
-- client object never holds it); the token rides on every call and stream.
-- Signing in (again) is the engine's shared Authenticate (src/auth.c):
-- a Lua call refused for its token, a background service and a watch
-- whose token expired at the same moment all wait for the same one. Auth
-- administration (users, roles) is in admin.lua.
local core = require "etcd3.core"
local errors = require "etcd3.error"
local wait = require "etcd3.wait"

local now = core.now

local _M = {}

--- Waits until the client holds a token newer than `since` (core.now()
-- when the refused request left): joins or starts the shared
-- Authenticate, and tries the next endpoint while members are
-- UNAVAILABLE, within `deadline`. true | nil, err (etcd's refusal of the
-- credentials comes back as it is, never retried).
---@param client etcd3.Client
---@param since number
---@param deadline number
---@return boolean|nil ok
---@return etcd3.Error? err
function _M.renew(client, since, deadline)
  local handle = client._core
  local pending = wait.polling_op(function() return handle:reauth(since) ~= "pending" end)
  for _ = 1, #client._endpoints.list do
    local state, code, message = handle:reauth(since)
    -- (another Authenticate may start between the wait and the question)
    while state == "pending" do
      local ready, err = wait.until_ready(client, pending, deadline, "Auth.Authenticate",
        "no answer to Authenticate in time")
      if not ready then return nil, err end
      state, code, message = handle:reauth(since)
    end
    if state == "ok" then return true end
    -- the engine moved on to the next member: a new Authenticate goes there
    if code ~= "UNAVAILABLE" or now() >= deadline then
      return nil, errors.new(code, message, "Auth.Authenticate")
    end
    since = now()
  end
  return nil, errors.new("UNAVAILABLE", "no member answered Authenticate", "Auth.Authenticate")
end

--- Hands user and password to C and authenticates (etcd3.new's `user`).
---@param client etcd3.Client
---@return boolean|nil ok
---@return etcd3.Error? err
function _M.sign_in(client, user, password, timeout)
  client._core:set_credentials(user, password)
  local started = now()
  return _M.renew(client, started, started + timeout)
end

--- Gives `to` the token `from` holds (a sibling client for one member).
function _M.share_token(from, to)
  local token = from._core:token()
  if token then to._core:set_token(token) end
end

return _M
