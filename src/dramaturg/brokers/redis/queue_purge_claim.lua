-- Takes over the oldest purge step at least ARGV[2] ms old (Redis's clock, as
-- queue_purge.lua dates steps): one its purge left behind (killed between queue_purge.lua
-- and the tasks' records). The step becomes the caller's (owner = ARGV[3]) and its score
-- moves to now, so no other process takes it until it is as old again (the caller died
-- finishing it too).
-- Returns {} when there is none, else {name, {field, value, ...}} (the step's hash).
-- KEYS: the sorted set of steps. ARGV: the prefix of the steps' keys, the age (ms), the
-- caller's token.
local time = redis.call("time")
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local names = redis.call("zrangebyscore", KEYS[1], "-inf", now - tonumber(ARGV[2]), "LIMIT", 0, 10)
for _, name in ipairs(names) do
    local key = ARGV[1] .. name
    if redis.call("hexists", key, "given") == 0 and redis.call("exists", key) == 1 then
        redis.call("hset", key, "owner", ARGV[3])
        redis.call("zadd", KEYS[1], now, name)
        return {name, redis.call("hgetall", key)}
    end
    redis.call("zrem", KEYS[1], name)
end
return {}
