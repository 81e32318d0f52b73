--- Authentication of a client: signing in with user and password, and
-- signing in again when etcd rejects an expired token.
--
-- The password is handed to the C module once and kept there only (the
-- client object never holds it); the token C receives rides on every call
-- and stream. Auth administration (users, roles) is in admin.lua.
local core = require "etcd3.core"
local wait = require "etcd3.wait"

local math_max = math.max
local now = core.now

local _M = {}

--- Authenticates with the credentials kept in C, trying the endpoints in
-- turn while they are UNAVAILABLE. true | nil, err
---@param client etcd3.Client
---@param timeout number seconds
---@return true|nil ok
---@return etcd3.Error? err
function _M.authenticate(client, timeout)
  local handle, set = client._core, client._endpoints
  local deadline = now() + timeout
  local err
  for _ = 1, #set.list do
    local i = set:pick(handle)
    local call = handle:authenticate(i, math_max(deadline - now(), 0))
    local res, call_err, completed = wait.for_response(client, call, deadline, "Auth.Authenticate")
    if res then
      handle:set_token(res.token)
      return true
    end
    if not completed then return nil, call_err end
    err = call_err
    if err.code ~= "UNAVAILABLE" then break end
    set:failed(i)
  end
  return nil, err
end

--- Hands user and password to C and authenticates (etcd3.new's `user`).
---@param client etcd3.Client
---@return true|nil ok
---@return etcd3.Error? err
function _M.sign_in(client, user, password, timeout)
  client._core:set_credentials(user, password)
  return _M.authenticate(client, timeout)
end

--- Whether an error with `code` may go away by signing in again: etcd's
-- simple tokens live --auth-token-ttl seconds, then it answers
-- UNAUTHENTICATED. Repeating the request afterwards is safe for writes
-- too: etcd refused it before applying it.
function _M.token_expired(client, code)
  return code == "UNAUTHENTICATED" and client._user ~= nil
end

--- Gives `to` the token `from` holds (a sibling client for one member).
function _M.share_token(from, to)
  local token = from._core:token()
  if token then to._core:set_token(token) end
end

return _M
