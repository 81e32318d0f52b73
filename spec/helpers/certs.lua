--- Test certificates, made with openssl into a temp dir at test time:
-- a CA, a server certificate for IP 127.0.0.1, a client certificate, and
-- the bad ones the TLS specs need (another CA, a certificate for the wrong
-- name, an expired one).
local helper = require "spec.helpers.etcd"

local _M = {}

-- openssl's command line, as etcd3.testing makes its own certificates
local parts = require("etcd3.testing").parts
local ca, leaf = parts.certificate_authority, parts.certificate

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
