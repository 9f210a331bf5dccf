from bucketwire.cli import main

main()
