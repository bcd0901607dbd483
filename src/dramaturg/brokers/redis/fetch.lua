-- Claims up to ARGV[4] messages of a queue, as Dramatiq's fetch command does (its
-- heartbeat too), and returns each claimed id followed by its body. An id whose body is
-- gone (purged, acknowledged by a worker that recovered it) is dropped, not claimed:
-- Dramatiq claimed it for good.
-- KEYS: namespace; ARGV: queue, worker id, now (ms), how many
local queue = KEYS[1] .. ":" .. ARGV[1]
local bodies = queue .. ".msgs"
local claims = KEYS[1] .. ":__acks__." .. ARGV[2] .. "." .. ARGV[1]
redis.call("zadd", KEYS[1] .. ":__heartbeats__", ARGV[3], ARGV[2])
local found = {}
for _ = 1, tonumber(ARGV[4]) do
    local id = redis.call("lpop", queue)
    if not id then
        break
    end
    local body = redis.call("hget", bodies, id)
    if body then
        redis.call("sadd", claims, id)
        found[#found + 1] = id
        found[#found + 1] = body
    end
end
return found
