-- Drops the messages waiting in lists and returns their bodies (dramaturg queue purge).
-- Only ids still in a list go: a claimed (running) message's id is in its worker's claim
-- set, not in the list, so its body stays. Atomic, so a worker's fetch (fetch.lua) takes an
-- id either before (it runs) or never (it is purged).
-- KEYS: pairs of (list, bodies hash). ARGV: none.
local found = {}
for i = 1, #KEYS, 2 do
    local ids = redis.call("lrange", KEYS[i], 0, -1)
    redis.call("del", KEYS[i])
    for first = 1, #ids, 1000 do
        local chunk = {unpack(ids, first, math.min(first + 999, #ids))}
        local bodies = redis.call("hmget", KEYS[i + 1], unpack(chunk))
        redis.call("hdel", KEYS[i + 1], unpack(chunk))
        for k = 1, #chunk do
            if bodies[k] then
                found[#found + 1] = bodies[k]
            end
        end
    end
end
return found
