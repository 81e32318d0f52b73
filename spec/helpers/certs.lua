--- Test certificates, made with openssl into a temp dir at test time:
-- a CA, a server certificate for IP 127.0.0.1, a client certificate, and
-- the bad ones the TLS specs need (another CA, a certificate for the wrong
-- name, an expired one).
local helper = require "spec.helpers.etcd"

local _M = {}

local function run(dir, cmd)
  assert(helper.sh("cd " .. dir .. " && " .. cmd .. " >/dev/null 2>&1"), "openssl failed: " .. cmd)
end

local function ca(dir, name)
  run(dir, ("openssl req -x509 -newkey rsa:2048 -nodes -keyout %s.key -out %s.pem -days 3650 -subj /CN=%s"):format(
    name, name, name))
end

-- A certificate signed by `by`, valid `days` (0: expires at once).
local function leaf(dir, name, by, san, days)
  run(dir, ("openssl req -newkey rsa:2048 -nodes -keyout %s.key -out %s.csr -subj /CN=%s"):format(name, name, name))
  local f = assert(io.open(dir .. "/" .. name .. ".ext", "w"))
  f:write("subjectAltName=" .. san .. "\n")
  f:close()
  run(dir, ("openssl x509 -req -in %s.csr -CA %s.pem -CAkey %s.key -CAcreateserial -out %s.pem -days %d -extfile %s.ext"):format(
    name, by, by, name, days, name))
end

function _M.make()
  local dir = helper.capture("mktemp -d /tmp/etcd3-certs.XXXXXX"):gsub("%s+$", "")
  ca(dir, "ca")
  ca(dir, "other-ca")
  leaf(dir, "server", "ca", "IP:127.0.0.1,DNS:etcd.internal", 3650) -- README: server_name
  leaf(dir, "client", "ca", "DNS:client", 3650)
  leaf(dir, "wrong-name", "ca", "DNS:wrong.example", 3650)
  leaf(dir, "expired", "ca", "IP:127.0.0.1", 0)
  local function pair(name) return dir .. "/" .. name .. ".pem", dir .. "/" .. name .. ".key" end
  local certs = { dir = dir, ca = dir .. "/ca.pem", other_ca = dir .. "/other-ca.pem" }
  certs.server_cert, certs.server_key = pair("server")
  certs.client_cert, certs.client_key = pair("client")
  certs.wrong_cert, certs.wrong_key = pair("wrong-name")
  certs.expired_cert, certs.expired_key = pair("expired")
  function certs.remove() helper.sh("rm -rf '" .. dir .. "'") end
  return certs
end

return _M
