from bucketwire_start import main

main()
