# Stand-in for the official haproxy:2.6 (Debian's haproxy 2.6 on bookworm): the config at
# /usr/local/etc/haproxy/haproxy.cfg, master-worker in the foreground (-W -db), runs as
# user haproxy, STOPSIGNAL SIGUSR1 (soft stop), as the official image does.
FROM roomcast-standin/bookworm
RUN mkdir -p /usr/local/etc/haproxy /var/lib/haproxy && chown haproxy:haproxy /var/lib/haproxy
COPY haproxy-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGUSR1
USER haproxy
WORKDIR /var/lib/haproxy
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
