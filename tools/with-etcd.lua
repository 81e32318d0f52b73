-- usage: lua tools/with-etcd.lua command...
-- Starts a throwaway single etcd member on 127.0.0.1 (free ports, temp
-- data dir), runs the command with ETCDCTL_ENDPOINTS pointing at it, then
-- stops that member by its PID and removes its data dir.
local helper = require "spec.helpers.etcd"

local member = helper.single()
local args = {}
for i = 1, #arg do args[i] = "'" .. arg[i]:gsub("'", "'\\''") .. "'" end
local ok, how, code = os.execute("ETCDCTL_ENDPOINTS=" .. member.endpoint .. " " .. table.concat(args, " "))
member:stop()
if type(ok) == "number" then code = ok / 256 elseif how == "signal" then code = 128 + code end
os.exit(code or 1)
