-- Gives a purge's step back: the tasks queue_purge.lua took, whose records could not be
-- written, go back to the heads of their lists in the order they were taken, with their
-- bodies (a worker takes them next, as it would have).
-- KEYS: pairs of (list, bodies hash), as queue_purge.lua's. ARGV: (list's index in KEYS,
-- id, body) for each task, in the order queue_purge.lua returned them.
for a = #ARGV - 2, 1, -3 do
    local i = tonumber(ARGV[a])
    redis.call("hset", KEYS[i + 1], ARGV[a + 1], ARGV[a + 2])
    redis.call("lpush", KEYS[i], ARGV[a + 1])
end
return #ARGV / 3
