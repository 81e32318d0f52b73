-- TLS: https endpoints, the tls table, mutual TLS, and every failure a
-- clear error: never a hang, never a silent plaintext fallback.
local etcd3 = require "etcd3"
local helper = require "spec.helpers.etcd"
local certs_helper = require "spec.helpers.certs"

describe("TLS", function()
  local certs, plain_tls, mutual, wrong_name, expired

  setup(function()
    certs = certs_helper.make()
    plain_tls = helper.single { tls = { cert = certs.server_cert, key = certs.server_key } }
    mutual = helper.single { tls = { cert = certs.server_cert, key = certs.server_key, ca = certs.ca,
      client_auth = true, client_cert = certs.client_cert, client_key = certs.client_key } }
    wrong_name = helper.single { tls = { cert = certs.wrong_cert, key = certs.wrong_key } }
    expired = helper.single { tls = { cert = certs.expired_cert, key = certs.expired_key } }
  end)
  teardown(function()
    for _, m in ipairs { plain_tls, mutual, wrong_name, expired } do m:stop() end
    if certs then certs.remove() end
  end)

  local function fails_fast(config, pattern)
    config.dial_timeout = config.dial_timeout or 2
    local t0 = helper.now()
    local cli, err = etcd3.new(config)
    assert.is_nil(cli)
    assert.is_true(etcd3.is_error(err))
    assert.is_true(helper.now() - t0 < 4, "took " .. (helper.now() - t0))
    if pattern then assert.matches(pattern, tostring(err)) end
    return err
  end

  it("works with an https endpoint and the CA", function()
    local cli = assert(etcd3.new { endpoints = "https://" .. plain_tls.endpoint, tls = { ca = certs.ca } })
    assert(cli:put("/tls/k", "v"))
    assert.are.equal("v", assert(cli:get("/tls/k")).kvs[1].value)
    local w = assert(cli:watch("/tls/k"))
    assert(cli:put("/tls/k", "w"))
    assert.are.equal("w", assert(w:next(5)).kv.value)
    cli:close()
  end)

  it("works with a tls table and a plain host:port endpoint", function()
    local cli = assert(etcd3.new { endpoints = plain_tls.endpoint, tls = { ca = certs.ca } })
    assert(cli:get("/tls/k"))
    cli:close()
  end)

  it("does mutual TLS", function()
    local cli = assert(etcd3.new { endpoints = "https://" .. mutual.endpoint,
      tls = { ca = certs.ca, cert = certs.client_cert, key = certs.client_key } })
    assert(cli:put("/mtls/k", "v"))
    assert.are.equal("v", assert(cli:get("/mtls/k")).kvs[1].value)
    cli:close()
  end)

  it("checks the name given as server_name", function()
    local cli = assert(etcd3.new { endpoints = "https://" .. wrong_name.endpoint,
      tls = { ca = certs.ca, server_name = "wrong.example" } })
    assert(cli:get("/k"))
    cli:close()
  end)

  it("fails clearly with a wrong CA", function()
    fails_fast({ endpoints = "https://" .. plain_tls.endpoint, tls = { ca = certs.other_ca } },
      "certificate verify failed")
    -- and a call on a lazily connected client fails, it does not hang
    local cli = assert(etcd3.new { endpoints = "https://" .. plain_tls.endpoint, tls = { ca = certs.other_ca },
      dial_timeout = 0, timeout = 2 })
    local res, err = cli:get("/k")
    assert.is_nil(res)
    assert.are.equal("UNAVAILABLE", err.code)
    cli:close()
  end)

  it("fails clearly with a server certificate for another name", function()
    fails_fast({ endpoints = "https://" .. wrong_name.endpoint, tls = { ca = certs.ca } },
      "Peer name 127.0.0.1 is not in peer certificate")
  end)

  it("fails clearly with an expired server certificate", function()
    fails_fast({ endpoints = "https://" .. expired.endpoint, tls = { ca = certs.ca } }, "certificate verify failed")
  end)

  it("fails clearly without a client certificate where the server demands one", function()
    -- gRPC alone says "Endpoint read failed": the message names the cause
    local because = "the server refused the TLS handshake: no client certificate%?"
    fails_fast({ endpoints = "https://" .. mutual.endpoint, tls = { ca = certs.ca } }, because)
    local cli = assert(etcd3.new { endpoints = "https://" .. mutual.endpoint, tls = { ca = certs.ca },
      dial_timeout = 0, timeout = 2 })
    local t0 = helper.now()
    local res, err = cli:get("/k")
    assert.is_nil(res)
    assert.is_true(etcd3.is_error(err))
    assert.matches(because, tostring(err))
    assert.is_true(helper.now() - t0 < 3)
    cli:close()
  end)

  it("never falls back to plaintext", function()
    -- a TLS client against a plaintext member fails
    local plain = helper.single()
    fails_fast { endpoints = "https://" .. plain.endpoint, tls = { ca = certs.ca } }
    -- a plaintext client against a TLS member fails
    fails_fast { endpoints = "http://" .. plain_tls.endpoint }
    plain:stop()
  end)

  it("raises on a bad tls table", function()
    for _, case in ipairs {
      { { cafile = "x" }, "etcd3.new: unknown option 'cafile'" },
      { { ca = "/nonexistent/ca.pem" }, "etcd3.new: tls.ca: cannot read /nonexistent/ca.pem" },
      { { cert = certs.client_cert }, "etcd3.new: tls: 'cert' and 'key' go together" },
      { { ca = 5 }, "etcd3.new: option 'ca': string expected" },
    } do
      local ok, msg = pcall(etcd3.new, { endpoints = plain_tls.endpoint, tls = case[1] })
      assert.is_false(ok)
      assert.matches(case[2], msg, 1, true)
    end
  end)
end)
