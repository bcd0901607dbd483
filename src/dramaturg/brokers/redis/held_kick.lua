-- Moves kicked tasks to their queue as Dramatiq's enqueue does (the body in
-- <ns>:<queue>.msgs, the Redis id at the tail of <ns>:<queue>) and forgets them, each
-- only if it is still taken with the kicker's token: a kicker that stalled past its
-- lease enqueues nothing that was given back (and maybe kicked by another) meanwhile.
-- KEYS[6]: the broker's namespace. ARGV: token, then per task: message id, queue (lane or
-- delay queue), Redis id, body. Returns the message ids moved.
local moved = {}
for a = 2, #ARGV, 4 do
    local id = ARGV[a]
    if redis.call("hget", KEYS[5], id) == ARGV[1] then
        local queue = KEYS[6] .. ":" .. ARGV[a + 1]
        redis.call("hset", queue .. ".msgs", ARGV[a + 2], ARGV[a + 3])
        redis.call("rpush", queue, ARGV[a + 2])
        redis.call("hdel", KEYS[3], id)
        redis.call("zrem", KEYS[4], id)
        redis.call("hdel", KEYS[5], id)
        moved[#moved + 1] = id
    end
end
return moved
