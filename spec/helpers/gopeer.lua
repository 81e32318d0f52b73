--- The Go peer of the interop specs (spec/helpers/gopeer.go): built once
-- in GOPATH mode, offline, from Debian's golang-etcd-server-dev (as
-- bench/run.lua builds its Go driver), and cached in build/gopeer until
-- the source changes. Without Go (`sh tools/deps.sh` installs it) build()
-- returns nil and the interop specs say why they are skipped, except in CI
-- (CI set), where that is an error; a peer that does not build is an error
-- everywhere. Several spec runs at once may build it: each builds into a
-- file of its own and renames it into place.
local helper = require "spec.helpers.etcd"
local process = require "spec.helpers.process"

local _M = {}

local SOURCE = "spec/helpers/gopeer.go"
local DIR = "build/gopeer"
local BIN = DIR .. "/gopeer"

local built

--- The peer's path, building it when needed; nil, why when it cannot be.
function _M.build()
  if built ~= nil then return built or nil, _M.why end
  built = false
  if helper.sh(("[ %s -nt %s ]"):format(BIN, SOURCE)) then
    built = BIN
    return BIN
  end
  if not helper.sh("command -v go >/dev/null 2>&1 && [ -d /usr/share/gocode/src/go.etcd.io/etcd/contrib/recipes ]") then
    _M.why = "Go or golang-etcd-server-dev is missing (sh tools/deps.sh)"
    if os.getenv("CI") then error(_M.why) end
    return nil, _M.why
  end
  local root = helper.capture("pwd"):gsub("%s+$", "")
  local src = root .. "/" .. DIR .. "/gopath/src/gopeer"
  local tmp = ("%s/%s.%d"):format(root, BIN, helper.free_port())
  local ok = helper.sh(("mkdir -p %s && cp %s %s/main.go && cd %s && GO111MODULE=off GOPROXY=off GOFLAGS= "
    .. "GOPATH=%s/%s/gopath:/usr/share/gocode GOCACHE=%s/%s/gocache go build -o %s . >%s.log 2>&1 && mv %s %s/%s"):format(
    src, SOURCE, src, src, root, DIR, root, DIR, tmp, tmp, tmp, root, BIN))
  if not ok then error("the Go peer did not build: see " .. tmp .. ".log") end
  os.remove(tmp .. ".log")
  built = BIN
  return BIN
end

local function command(member, args)
  local words = { "exec", BIN, member.endpoint }
  for _, a in ipairs(args) do words[#words + 1] = process.quote(a) end
  return table.concat(words, " ")
end

--- Starts the peer against `member` in the background: { pid, out } as
-- process.spawn (stop it with process.stop; read it with process.output).
function _M.start(member, ...)
  return process.spawn(command(member, { ... }))
end

return _M
